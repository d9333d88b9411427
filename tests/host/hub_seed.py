"""A local Hugging Face Hub cache with one repository, laid out as huggingface_hub writes it, so the
real `hf_hub_download` path runs with no network:

    <cache>/models--<org>--<name>/blobs/<sha256>                     the file's bytes
                                  refs/main                           the commit "main" points at
                                  snapshots/<commit>/<path in repo>   -> ../../blobs/<sha256>
"""

from __future__ import annotations

import hashlib
import os

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def seed_hub_cache(cache_dir: str, repo_id: str, filename: str, data: bytes, commit: str = COMMIT) -> str:
    """Put `data` in the cache as `repo_id/filename` at `commit` (also `main`); returns the blob path."""
    repo = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    sha = hashlib.sha256(data).hexdigest()
    blob = os.path.join(repo, "blobs", sha)
    pointer = os.path.join(repo, "snapshots", commit, *filename.split("/"))
    for folder in (os.path.dirname(blob), os.path.dirname(pointer), os.path.join(repo, "refs")):
        os.makedirs(folder, exist_ok=True)
    with open(blob, "wb") as f:
        f.write(data)
    os.symlink(os.path.relpath(blob, os.path.dirname(pointer)), pointer)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return blob
