"""FastGen Load Model: the shipped embedded networks and user-trained FastGen files as MODELs."""

from __future__ import annotations

from comfy_api.latest import io

from .host.embedded import load_digit_model
from .host.model_files import embedded_models, resolve_model_path, user_models
from .host.recipes import with_source


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
