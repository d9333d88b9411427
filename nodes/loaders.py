"""FastGen Load Model: the shipped embedded networks and user-trained FastGen files as MODELs."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..fastgen_core import checkpoint
from ..fastgen_core.eval import ASSETS
from .adapters.embedded import load_digit_model
from .adapters.recipes import with_source

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


class FastGenLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenLoadModel",
            display_name="FastGen Load Model",
            category="FastGen/load",
            description="Loads a FastGen network (the shipped digit teacher, or one you trained) as a native MODEL "
            "that the stock KSampler, LoRA loaders and model patches accept.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=embedded_models() + user_models(),
                    tooltip="embedded/… files ship with the pack; FastGen files you place in models/diffusion_models appear too.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A flow-matching MODEL (3-channel pixel space: decode with VAE Loader 'pixel_space').")],
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        return io.NodeOutput(with_source(load_digit_model(resolve_model_path(model_name)), model_name))
