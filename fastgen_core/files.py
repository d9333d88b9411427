"""Writing files atomically, and reading a safetensors header.

Every file the pack writes (networks, LoRAs, quantized models, training states, recipe sidecars,
Hub downloads, images) goes through `atomic_path`: the data go to a temporary file in the target's
folder, reach the disk, and only then take the final name. An interrupted or failed save never
leaves a half-written file under that name, and a power cut just after the rename cannot leave an
empty one there.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

from safetensors import SafetensorError, safe_open

# the temporary name carries the start of the target's name (to tell what a stale one was) but stays
# well inside the file system's 255 bytes however long the target's own name is
_NAME_BYTES_IN_TEMP = 64


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes the temporary file 0600: the saved file gets the mode a plain open() would have
# given it, so that a ComfyUI running as another user of the group can read what this one saved
_NEW_FILE_MODE = 0o666 & ~_process_umask()


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path` to write to; when the block succeeds, the file is
    flushed to disk and moved over `path`; when it fails, the temporary file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(path).encode()[:_NAME_BYTES_IN_TEMP].decode(errors="ignore")
    # hidden and ending in ".partial", not the target's extension: a write cut short by a kill
    # leaves a file the host's model lists (filtered by extension) do not show
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{name}.partial", dir=folder)
    os.close(fd)
    try:
        yield tmp
        if os.stat(tmp).st_nlink == 1:  # not a hard link to a file of someone else's (a Hub cache blob)
            os.chmod(tmp, _NEW_FILE_MODE)
        _flush_to_disk(tmp)
        os.replace(tmp, path)
        _flush_folder(folder)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _flush_to_disk(path: str) -> None:
    # a read-only descriptor is enough on POSIX (and the file may be a hard link to a read-only
    # blob); Windows' FlushFileBuffers needs write access
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_folder(folder: str) -> None:
    """Make the rename itself durable where the system can sync a folder (POSIX). Some file systems
    (network shares) refuse; the rename has happened by then, so that is not an error."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_metadata(path: str) -> dict[str, str]:
    """The metadata in a safetensors file's header (no tensor is loaded). A missing file raises
    FileNotFoundError, a file that is not readable safetensors ValueError, both naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from None
