"""The embedded FastGen networks as native ComfyUI models.

The pattern is the host's own pixel-space model, ChromaRadiance: a `supported_models_base.BASE`
subclass (latent format, sampling settings, dtypes) and a `model_base.BaseModel` built with our
network as its `unet_model` and `ModelType.FLOW`, wrapped in a `ModelPatcher`. The host then
samples it with its own KSampler, applies LoRAs through its weight patching, and runs wrappers
(EasyCache, our cache and quantize patches) around it like any other model.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models_base
import torch

from ...fastgen_core import checkpoint
from ...fastgen_core.networks import NUM_CLASS_TOKENS, DigitDiT, DigitDiTConfig
from . import file_dtypes
from .recipes import RECIPE_OPTION

DIGIT_IMAGE_MODEL = "fastgen_digit_dit"


class HostDigitDiT(DigitDiT):
    """DigitDiT with the host's calling convention: forward(x, timestep, context, ...).

    `context` is the CONDITIONING tensor [B, 1, 11] from "FastGen Digit Conditioning"; the timestep
    is sigma itself (the model config sets the flow multiplier to 1). DIFFUSION_MODEL wrappers
    (EasyCache, our patches) run around the whole forward, as on the host's own models.
    """

    def __init__(self, image_model=None, dtype=None, device=None, operations=None, **config):
        super().__init__(DigitDiTConfig.from_dict(config), operations=operations or torch.nn, device=device, dtype=dtype)
        self.dtype = dtype if dtype is not None else torch.float32  # BaseModel.get_dtype reads it

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):
        wrappers = comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
        if wrappers:
            # In fp32, BaseModel hands us the sampler's own latent (xc.to(dtype) is a no-op), and
            # some wrappers write into their input (the host's EasyCache does `x += diff` when it
            # skips a step), which would corrupt the sampler's state. A private copy is cheap here.
            x = x.clone()
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timestep, context, control, transformer_options, **kwargs
        )

    def _forward(self, x, timestep, context, control=None, transformer_options={}, **kwargs):
        if context is None or context.ndim != 3 or context.shape[-1] != NUM_CLASS_TOKENS:
            shape = None if context is None else list(context.shape)
            raise ValueError(
                f"The FastGen digit model needs its own conditioning (FastGen Digit Conditioning, "
                f"[B, 1, {NUM_CLASS_TOKENS}]); it got {shape}. A text encoder's CONDITIONING does not fit this model."
            )
        tokens, c = self.embed(x, timestep, context.mean(dim=1))
        # block replacement as the host's Wan and Flux loops offer it, so block-level patches
        # (our block / chunk cache, anything using set_model_patch_replace) apply here too
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"])}

                args = {"img": tokens, "vec": c, "transformer_options": transformer_options}
                tokens = blocks_replace[("double_block", i)](args, {"original_block": block_wrap})["img"]
            else:
                tokens = block(tokens, c)
        return self.head(tokens, c, x.shape[-2], x.shape[-1])


class FastGenDigits(comfy.supported_models_base.BASE):
    """Model config for the embedded digit DiT: 3-channel pixel space, flow, sigma as timestep."""

    unet_config = {"image_model": DIGIT_IMAGE_MODEL}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
    latent_format = comfy.latent_formats.ChromaRadiance  # 3 channels, identity preview: pixels
    memory_usage_factor = 0.05
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.BaseModel(self, model_type=comfy.model_base.ModelType.FLOW, device=device, unet_model=HostDigitDiT)

    def clip_target(self, state_dict={}):
        return None


def load_digit_model(path: str) -> comfy.model_patcher.ModelPatcher:
    """A FastGen DigitDiT file -> a native MODEL (ModelPatcher around a host BaseModel)."""
    arch, config, recipe = checkpoint.network_info(path)
    checkpoint.check_file_fits(arch, config, path)  # before any tensor is read
    return digit_model_from_state_dict(arch, config, recipe, checkpoint.load_state_dict(path), path)


def digit_model_from_state_dict(arch: str, config: dict, recipe, state_dict: dict, path: str) -> comfy.model_patcher.ModelPatcher:
    """A DigitDiT's config and weights (e.g. decompressed from a quantized file) -> a native MODEL."""
    if arch != "DigitDiT":
        raise ValueError(f"{path} holds a {arch}, which is not a diffusion model this loader can run")
    checkpoint.check_state_dict(checkpoint.build_network(arch, config, source=path, device="meta"), state_dict, path)

    model_config = FastGenDigits({**config, "image_model": DIGIT_IMAGE_MODEL})
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    parameters = sum(t.numel() for t in state_dict.values())
    weight_dtype = next(iter(state_dict.values())).dtype
    unet_dtype = comfy.model_management.unet_dtype(
        model_params=parameters, supported_dtypes=model_config.supported_inference_dtypes, weight_dtype=weight_dtype
    )
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)

    model = model_config.get_model(state_dict).to(offload_device)
    file_dtypes.remember(model, file_dtypes.of(state_dict))  # before loading, which empties state_dict
    model.load_model_weights(state_dict, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if recipe is not None:
        patcher.model_options[RECIPE_OPTION] = recipe  # read by the recipe-aware nodes
    return patcher
