"""The pack's model names: the shipped embedded networks and FastGen files in the host's folders."""

from __future__ import annotations

import os

import folder_paths

from ...fastgen_core import checkpoint
from ...fastgen_core.eval import ASSETS

EMBEDDED_PREFIX = "embedded/"


def embedded_models(arch: str = "DigitDiT") -> list[str]:
    """Shipped networks of one architecture (the classifier is an asset too, but not a MODEL)."""
    names = []
    for name in sorted(os.listdir(ASSETS)):
        if name.endswith(".safetensors") and _arch(os.path.join(ASSETS, name)) == arch:
            names.append(EMBEDDED_PREFIX + name)
    return names


def user_models(arch: str = "DigitDiT") -> list[str]:
    """FastGen files of one architecture in the host's diffusion_models folders (others left out)."""
    names = []
    for name in folder_paths.get_filename_list("diffusion_models"):
        if name.endswith(".safetensors"):
            path = folder_paths.get_full_path("diffusion_models", name)
            if path and _arch(path) == arch:
                names.append(name)
    return names


def _arch(path: str) -> str | None:
    try:
        return checkpoint.network_info(path)[0]
    except (OSError, ValueError):
        return None


def resolve_model_path(name: str) -> str:
    if name.startswith(EMBEDDED_PREFIX):
        base = name[len(EMBEDDED_PREFIX):]
        if os.path.basename(base) != base:
            raise ValueError(f"bad embedded model name {name!r}")
        path = os.path.join(ASSETS, base)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"embedded model {name!r} is missing from {ASSETS}; reinstall the pack")
        return path
    return folder_paths.get_full_path_or_raise("diffusion_models", name)
