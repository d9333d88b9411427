"""Known students from the Hugging Face Hub, placed in the right host folder with their recipe.

A catalogue entry names a public student file (repo, file, pinned commit, size and sha256 where we
know them), the host folder it belongs in (`loras` / `diffusion_models`) and its recipe, which is
the known-students table's own (`recipe.identify_student` on the file's name), never a copy.

`fetch` downloads through `huggingface_hub.hf_hub_download` (resumable, into the Hub cache; the
token is the environment's: HF_TOKEN or a `hf auth login`, never passed or stored here), places the
file in the folder by hard link (else a copy, atomically through a temporary name), checks its
sha256 and writes the recipe to a `<file>.recipe.json` sidecar: the file itself stays byte-identical
so it can be verified again. Offline (HF_HUB_OFFLINE, or the Hub unreachable) it fails within a
second, saying what is missing and how to place it by hand.

Shell:  python -m fastgen_core.hub list
        python -m fastgen_core.hub get NAME --dest ComfyUI/models/loras
        python -m fastgen_core.hub get custom --repo ORG/NAME --file F.safetensors --folder loras --dest DIR
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace

from .files import atomic_path
from .recipe import Recipe, identify_student, read_sidecar, write_sidecar

FOLDERS = ("loras", "diffusion_models")
CUSTOM = "custom"
STUDENT_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")  # what the student loaders read
NETWORK_PROBE_SECONDS = 0.8  # how long "is the Hub reachable?" may take before we call it offline
_HASH_CHUNK = 8 << 20
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubError(RuntimeError):
    """A download that cannot be done, with the reason, the file and the folder named."""

    __module__ = "fastgen"  # ComfyUI shows "<module>.<class>: message"; the pack's path is noise there


class HubOfflineError(HubError):
    pass


class ChecksumError(HubError):
    pass


@dataclass(frozen=True)
class HubEntry:
    name: str  # the catalogue key (the node's choice)
    repo_id: str
    filename: str  # path inside the repository
    folder: str  # host folder kind: "loras" or "diffusion_models"
    revision: str | None = None  # a 40-hex commit; None = not pinned yet ("main")
    sha256: str | None = None  # of the file as published; None = not known, the placed file's own is recorded
    size: int | None = None
    local_name: str | None = None  # the name in the folder when the repository's says nothing (pytorch_lora_weights)
    pin_source: str | None = None  # where the revision / sha256 come from
    recipe: Recipe | None = None  # filled from the known-students table (None for custom files it does not know)
    student: str | None = None  # the known student's name in that table

    @property
    def target_name(self) -> str:
        return self.local_name or os.path.basename(self.filename)

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision or 'main'}/{self.filename}"


def _known(entry: HubEntry) -> HubEntry:
    """The entry with the recipe of the known student its file name identifies (steps from the name included)."""
    kind = "lora" if entry.folder == "loras" else "model"
    student = identify_student(entry.target_name, kind=kind)
    if student is None:
        raise ValueError(f"catalogue entry {entry.name}: {entry.target_name} is not in the known-students table")
    return replace(entry, recipe=student.recipe, student=student.name)


# Pins found offline (public sources that pin them, named in pin_source). Entries without a revision
# or sha256 are downloaded from "main" and the placed file's own sha256 is recorded in its sidecar:
# pin them before a release (the README lists which).
_REFINERS = "finegrain-ai/refiners src/refiners/conversion/models/loras.py (revision + sha256)"
_BFL = "black-forest-labs/flux README model table (sha256); the same sha256 and size in SimpleSDXL modules/models_info.py"
# a model-hash table whose SDXL-Lightning and FLUX schnell values match the two sources above; one source only here
_SIMPLESDXL = "SimpleSDXL modules/models_info.py (sha256 + size)"
_REFINERS_UNET = "finegrain-ai/refiners src/refiners/conversion/models/unet_sdxl.py, lightning_4step (revision + sha256)"
# the Hub's own answer quoted in a public report: `curl -I .../resolve/main/<file>` -> x-linked-etag (the LFS
# sha256) and x-linked-size; the same pair in a second, independent model table
_DMD2_HEAD = ("msit270/aiofm-nsfw notes/WS5-report.md (curl -I on tianweiy/DMD2 resolve/main: x-linked-etag, x-linked-size); "
              "the same sha256 in darkshapes/nnll nnll/mir/automata.py")
# a Hub cache path naming the file at a commit of the repository: the file exists at that commit
_DMD2_SNAPSHOT = "SammyS15/LATINO-PRO main_LATINO.py (models--tianweiy--DMD2/snapshots/<revision>/dmd2_sdxl_4step_unet_fp16.bin)"
_HYPER_1STEP = ("revision: a public script's Hub cache path models--ByteDance--Hyper-SD/snapshots/<revision>/"
                "Hyper-SDXL-1step-lora.safetensors; sha256: an installer's expected_sha256 for this file's URL, the same "
                "value in darkshapes/nnll nnll/mir/automata.py")
_HYPER_8CFG = ("a model note giving this file's path with its SHA256; the same LFS oid prefix (55b51334c850) in a "
               "second table built from library.json (sizes disagree between the two: size left unpinned)")

CATALOGUE: tuple[HubEntry, ...] = tuple(_known(e) for e in (
    HubEntry("lightx2v Wan2.1 T2V 14B step+CFG distill LoRA (rank 32)", "Kijai/WanVideo_comfy",
             "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", "loras"),
    HubEntry("CausVid Wan2.1 T2V 14B LoRA (rank 32, Kijai)", "Kijai/WanVideo_comfy",
             "Wan21_CausVid_14B_T2V_lora_rank32.safetensors", "loras"),
    HubEntry("DMD2 SDXL 4-step LoRA", "tianweiy/DMD2", "dmd2_sdxl_4step_lora_fp16.safetensors", "loras",
             sha256="b3d9173815a4b595991c3a7a0e0e63ad821080f314a0b2a3cc31ecd7fcf2cbb8", size=393_854_592, pin_source=_DMD2_HEAD),
    HubEntry("DMD2 SDXL 4-step UNet", "tianweiy/DMD2", "dmd2_sdxl_4step_unet_fp16.bin", "diffusion_models",
             revision="be22767697a1f3ca656b73c776e15fa335c86c6c", pin_source=_DMD2_SNAPSHOT),
    HubEntry("SDXL-Lightning 4-step LoRA", "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_lora.safetensors", "loras",
             revision="c9a24f48e1c025556787b0c58dd67a091ece2e44",
             sha256="bf56cf2657efb15e465d81402ed481d1e11c4677e4bcce1bc11fe71ad8506b79", size=393_854_592,
             pin_source=f"{_REFINERS}; size and the same sha256 in {_SIMPLESDXL}"),
    HubEntry("SDXL-Lightning 8-step LoRA", "ByteDance/SDXL-Lightning", "sdxl_lightning_8step_lora.safetensors", "loras"),
    HubEntry("SDXL-Lightning 4-step UNet", "ByteDance/SDXL-Lightning", "sdxl_lightning_4step_unet.safetensors", "diffusion_models",
             revision="c9a24f48e1c025556787b0c58dd67a091ece2e44",
             sha256="39a90a8a2a25c1372633c1e8eb1a96f85eab937bcb58cfc6ec9baf66242ec23c", pin_source=_REFINERS_UNET),
    HubEntry("Hyper-SDXL 1-step unified LoRA", "ByteDance/Hyper-SD", "Hyper-SDXL-1step-lora.safetensors", "loras",
             revision="1a091a0ba26e5639d083c6377ba4f2bed5115ccc",
             sha256="c912df184c5116792d2c604d26c6bc2aa916685f4a793755255cda1c43a3c78a", pin_source=_HYPER_1STEP),
    HubEntry("Hyper-SDXL 8-step LoRA", "ByteDance/Hyper-SD", "Hyper-SDXL-8steps-lora.safetensors", "loras",
             sha256="ca689190e8c46038550384b5675488526cfe5a40d35f82b27acb75c100f417c1", size=787_359_648, pin_source=_SIMPLESDXL),
    HubEntry("Hyper-SDXL 8-step CFG LoRA", "ByteDance/Hyper-SD", "Hyper-SDXL-8steps-CFG-lora.safetensors", "loras",
             sha256="55b51334c85061afff5eff7c550b61963c8b8607a5868bbe4f26db49374719b1", pin_source=_HYPER_8CFG),
    HubEntry("Hyper-SD1.5 8-step LoRA", "ByteDance/Hyper-SD", "Hyper-SD15-8steps-lora.safetensors", "loras"),
    HubEntry("Hyper-FLUX.1-dev 8-step LoRA", "ByteDance/Hyper-SD", "Hyper-FLUX.1-dev-8steps-lora.safetensors", "loras"),
    # the repository calls it pytorch_lora_weights.safetensors, which identifies nothing: placed under a telling name
    HubEntry("TCD SDXL LoRA", "h1t/TCD-SDXL-LoRA", "pytorch_lora_weights.safetensors", "loras", local_name="TCD-SDXL-LoRA.safetensors"),
    HubEntry("Qwen-Image-Lightning 8-step LoRA", "lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-8steps-V1.0.safetensors", "loras"),
    HubEntry("FLUX.1 schnell", "black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors", "diffusion_models",
             sha256="9403429e0052277ac2a87ad800adece5481eecefd9ed334e1f348723621d2a0a", size=23_782_506_688, pin_source=_BFL),
))


def catalogue_names() -> list[str]:
    return [e.name for e in CATALOGUE]


def catalogue_entry(name: str) -> HubEntry:
    for entry in CATALOGUE:
        if entry.name == name:
            return entry
    raise HubError(f"{name!r} is not in the FastGen Hub catalogue; choose one of: {', '.join(catalogue_names())}, or '{CUSTOM}'")


def custom_entry(repo_id: str, filename: str, folder: str, revision: str | None = None) -> HubEntry:
    """An entry for any Hub file, validated: a plain repo id, a relative file path with a student
    extension, a known folder. Its recipe is the known-students table's when the name is recognised."""
    repo_id, filename, revision = repo_id.strip(), filename.strip(), (revision or "").strip() or None
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise HubError(f"repo id {repo_id!r} is not of the form 'organisation/name'")
    check_filename(filename)
    if folder not in FOLDERS:
        raise HubError(f"folder {folder!r} must be one of {FOLDERS}")
    if revision is not None and (not re.match(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,99}$", revision) or ".." in revision):
        raise HubError(f"revision {revision!r} is not a commit, branch or tag name")
    entry = HubEntry(CUSTOM, repo_id, filename, folder, revision=revision)
    student = identify_student(entry.target_name, kind="lora" if folder == "loras" else "model")
    return entry if student is None else replace(entry, recipe=student.recipe, student=student.name)


def check_filename(filename: str) -> None:
    """Refuse names that could leave the target folder or are not student files."""
    if not filename or filename.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", filename) or "\\" in filename:
        raise HubError(f"file name {filename!r} must be a relative path inside the repository (no drive, no leading '/', no '\\')")
    parts = filename.split("/")
    if any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in filename):
        raise HubError(f"file name {filename!r} must not contain '..', '.', empty parts or control characters")
    if not filename.lower().endswith(STUDENT_EXTENSIONS):
        raise HubError(f"file name {filename!r} is not a student file ({', '.join(STUDENT_EXTENSIONS)})")


# ---------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class Placed:
    path: str  # the file in the target folder
    name: str  # its name relative to the folder: what the loaders take
    sha256: str
    downloaded: bool  # False when a good file was already there
    sidecar: str | None
    verified: bool = True  # False: a file already there, with no published checksum or earlier download to check it by


def fetch(entry: HubEntry, dest_dir: str, cache_dir: str | None = None, progress=None) -> Placed:
    """Make `entry` present and verified in `dest_dir` with its recipe sidecar.

    `progress(done_bytes, total_bytes)` is called while downloading. Raises HubOfflineError (fast,
    with how to place the file by hand), ChecksumError (the placed file deleted) or HubError.
    """
    check_filename(entry.filename)
    dest_dir = os.path.abspath(dest_dir)
    target = os.path.join(dest_dir, entry.target_name)
    if os.path.dirname(os.path.abspath(target)) != dest_dir:  # target_name is a checked base name: belt and braces
        raise HubError(f"{entry.target_name!r} would be written outside {dest_dir}")
    if os.path.lexists(target):
        sha, verified = _verify_present(entry, target)
        return Placed(target, entry.target_name, sha, False, _write_recipe(entry, target, sha), verified)
    os.makedirs(dest_dir, exist_ok=True)
    cached = _download(entry, dest_dir, cache_dir, progress)
    sha = _place(entry, cached, target)
    return Placed(target, entry.target_name, sha, True, _write_recipe(entry, target, sha, _commit_of(cached, entry)))


def _verify_present(entry: HubEntry, target: str) -> tuple[str, bool]:
    """The sha256 of a file already at the target, when it is the entry's file, and whether that
    was checked; else a clear error. A file of that name is only the entry's by its published
    sha256 / size, or by the sidecar of an earlier download of the same repository file (whose
    recorded sha256 it must still have); otherwise it is used, but not called verified.

    A sidecar that recorded this file's size and mtime spares re-hashing many gigabytes on every run.
    """
    if not os.path.isfile(target):
        raise HubError(f"{target} exists but is not a regular file; remove it to download {entry.repo_id}/{entry.filename}")
    stat = os.stat(target)
    recorded = _recorded(target)
    if recorded and recorded.get("size") == stat.st_size and recorded.get("mtime_ns") == stat.st_mtime_ns:
        sha = recorded.get("sha256")
    else:
        sha = sha256_of(target)
    if entry.sha256 and sha != entry.sha256 or entry.size and stat.st_size != entry.size:
        raise ChecksumError(
            f"{target} is already there but is not {entry.repo_id}/{entry.filename} (sha256 {sha}, expected {entry.sha256}; "
            f"{stat.st_size} bytes). It was left untouched: move it away and run again to download the right file."
        )
    ours = bool(recorded) and recorded.get("written_by") == "fastgen_core.hub" and recorded.get("sha256") == sha and (
        recorded.get("repo_id"), recorded.get("filename")) == (entry.repo_id, entry.filename)
    return sha, bool(entry.sha256 or entry.size) or ours


def _recorded(target: str) -> dict | None:
    try:
        return read_sidecar(target)
    except ValueError:
        return None  # a broken sidecar is rewritten below


def _download(entry: HubEntry, dest_dir: str, cache_dir: str | None, progress) -> str:
    """Path of the file in the Hub cache, downloaded if needed; HubOfflineError fast when it cannot be."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=entry.repo_id, filename=entry.filename, revision=entry.revision, cache_dir=cache_dir or hub_cache_dir(),
                  endpoint=hub_endpoint())
    try:  # the cache first: instant, and the only way when offline
        return hf_hub_download(**kwargs, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    reason = offline_reason()
    if reason:
        raise HubOfflineError(offline_message(entry, dest_dir, reason))
    if progress is not None and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = progress_tqdm(progress)
    try:
        return hf_hub_download(**kwargs)
    except LocalEntryNotFoundError as err:  # the connection dropped between the probe and the download
        raise HubOfflineError(offline_message(entry, dest_dir, f"the download failed ({err})")) from None
    except Exception as err:  # repository / file / revision not found, gated, 401, connection lost...
        if not _from_the_download(err):
            raise  # e.g. the host's Cancel raised from the progress callback: not a download error
        raise HubError(f"cannot download {entry.repo_id}/{entry.filename} at {entry.revision or 'main'}: "
                       f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def _from_the_download(err: Exception) -> bool:
    module = type(err).__module__.split(".")[0]
    return isinstance(err, (OSError, ValueError)) or module in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "hf_xet")


def hub_endpoint() -> str:
    """The Hub's address, from the environment at call time (HF_ENDPOINT: a mirror, or a test server)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hub_cache_dir() -> str:
    """The Hub cache, from the environment at call time (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def offline_reason() -> str | None:
    """Why the Hub cannot be reached now, or None. HF_HUB_OFFLINE is read from the environment at
    call time too (huggingface_hub only reads it at import); otherwise the endpoint (or the proxy)
    must accept a TCP connection within NETWORK_PROBE_SECONDS, so a machine without network fails
    in under a second instead of after the library's retries."""
    from huggingface_hub import constants

    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlsplit(proxy or endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host or not _reachable(host, port, NETWORK_PROBE_SECONDS):
        return f"{url.netloc or endpoint} cannot be reached (no network?)"
    return None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _reachable(host: str, port: int, timeout: float) -> bool:
    # name resolution ignores socket timeouts, so the whole probe runs in a thread we stop waiting for
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline_message(entry: HubEntry, dest_dir: str, reason: str) -> str:
    checks = f"; sha256 {entry.sha256}" if entry.sha256 else ""
    return (
        f"Cannot download {entry.repo_id}/{entry.filename}: {reason}, and it is not in the Hub cache "
        f"({hub_cache_dir()}). Place it by hand: on a machine with internet, download {entry.url}{checks}, "
        f"copy it to {os.path.join(dest_dir, entry.target_name)} (the '{entry.folder}' folder), then run this again "
        "to verify it and write its recipe."
    )


def progress_tqdm(callback):
    """A tqdm class that reports (done, total) bytes to `callback` (hf_hub_download's tqdm_class)."""
    from tqdm.auto import tqdm

    class CallbackTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # older huggingface_hub versions pass their own bar's extra argument
            kwargs["disable"] = False  # a disabled tqdm skips update(); the callback must still run
            kwargs["file"] = _Silent()  # the caller shows progress its own way
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            super().update(n)
            callback(int(self.n), int(self.total or 0))

    return CallbackTqdm


class _Silent:
    def write(self, text):
        return len(text)

    def flush(self):
        pass


def _place(entry: HubEntry, cached: str, target: str) -> str:
    """Link (else copy) the cached file to a temporary name beside the target, verify, then rename.
    A full disk, a Cancel or a checksum mismatch leaves no partial file in the folder."""
    blob = os.path.realpath(cached)
    with atomic_path(target) as tmp:
        os.remove(tmp)  # the link needs the name free
        try:
            try:
                os.link(blob, tmp)  # no second copy of a multi-GB file where the filesystem allows
            except OSError:
                shutil.copyfile(blob, tmp)
            sha = sha256_of(tmp)
        except OSError as err:
            raise HubError(f"cannot place {entry.repo_id}/{entry.filename} in {os.path.dirname(target)}: {err}") from None
        if entry.sha256 and sha != entry.sha256:
            _drop_from_cache(cached)
            raise ChecksumError(
                f"checksum mismatch for {entry.repo_id}/{entry.filename}: sha256 {sha}, expected {entry.sha256}. "
                f"The placed file was deleted (nothing written to {target}) and the corrupt copy was removed from the Hub "
                "cache; run again to download it afresh."
            )
    return sha


def _drop_from_cache(cached: str) -> None:
    """Remove a corrupt cached file (its snapshot link and blob) so the next try downloads it again."""
    blob = os.path.realpath(cached)
    for path in (cached, blob):
        if os.path.lexists(path):
            os.remove(path)


def _commit_of(cached: str, entry: HubEntry) -> str | None:
    """The commit the cached file was resolved at: its snapshot folder's name."""
    parts = os.path.normpath(cached).split(os.sep)
    if "snapshots" in parts:
        commit = parts[parts.index("snapshots") + 1]
        if _COMMIT.match(commit):
            return commit
    return entry.revision


def _write_recipe(entry: HubEntry, target: str, sha: str, commit: str | None = None) -> str | None:
    """The sidecar: recipe + provenance + the stat that lets a later run skip re-hashing."""
    previous = _recorded(target) or {}
    stat = os.stat(target)
    return write_sidecar(
        target, entry.recipe, repo_id=entry.repo_id, filename=entry.filename,
        revision=commit or previous.get("revision") or entry.revision, sha256=sha, size=stat.st_size,
        mtime_ns=stat.st_mtime_ns, student=entry.student, written_by="fastgen_core.hub",
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- command


def _table() -> str:
    rows = [("name", "folder", "repo / file", "revision", "sha256")]
    for e in CATALOGUE:
        rows.append((e.name, e.folder, f"{e.repo_id}/{e.filename}", e.revision[:12] if e.revision else "main*", (e.sha256 or "-")[:12]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines + ["* not pinned to a commit yet: downloads the repository's current file"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen_core.hub", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the catalogue")
    get = sub.add_parser("get", help="download a catalogue entry (or 'custom') into a folder with its recipe")
    get.add_argument("name", help=f"a catalogue name (quote it) or '{CUSTOM}'")
    get.add_argument("--dest", required=True, help="the target folder, e.g. ComfyUI/models/loras")
    get.add_argument("--repo", help="custom: repository id (organisation/name)")
    get.add_argument("--file", help="custom: file path inside the repository")
    get.add_argument("--folder", choices=FOLDERS, default="loras", help="custom: the kind of folder --dest is")
    get.add_argument("--cache", help="Hub cache folder (default: HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(_table())
        return 0
    try:
        entry = custom_entry(args.repo or "", args.file or "", args.folder) if args.name == CUSTOM else catalogue_entry(args.name)
        start = time.monotonic()
        placed = fetch(entry, args.dest, cache_dir=args.cache, progress=_print_progress)
    except HubError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    state = "downloaded" if placed.downloaded else "already present"
    print(f"\n{state}: {placed.path} (sha256 {placed.sha256}, {time.monotonic() - start:.1f} s)")
    print(f"recipe: {placed.sidecar}" if entry.recipe else "no known recipe for this file: set the sampler by hand")
    return 0


def _print_progress(done: int, total: int):
    print(f"\r{done / 1e6:,.1f} / {total / 1e6:,.1f} MB", end="", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
