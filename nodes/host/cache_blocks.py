"""Block adapters for the block and chunk caches: which blocks form the chain, in which order the
host calls them, how a block runs on a subset of tokens, and the latent's token grid.

Every architecture here goes through the host's own block replacement
(`transformer_options["patches_replace"]["dit"][(kind, i)]`, set with `set_model_patch_replace`),
the mechanism the host's Wan and Flux loops already honour (and our embedded DiT too), so the
cache composes with LoRA, weight patches and torch.compile instead of replacing the forward.
"""

from __future__ import annotations

import math


class BlockAdapter:
    """Defaults for chains of blocks that act on tokens `img` [B, L, C] (embedded DiT, Wan)."""

    name = "dit"
    deep_cache = False  # block policy as the deep-feature cache (U-Nets, which have no block replacement)
    token_args = ("pe",)  # block arguments with a token dimension (dim 1) to gather with img
    supports_chunks = True

    def __init__(self, diffusion_model):
        self.dm = diffusion_model

    def chain(self) -> list[tuple[str, int]]:
        return [("double_block", i) for i in range(len(self.dm.blocks))]

    def grid(self, x, timestep, kwargs) -> tuple[int, int, int] | None:
        raise NotImplementedError

    def base(self, out: dict):
        """The state after the first block, in the last block's output format."""
        return out["img"]

    def passthrough(self, args: dict) -> dict:
        return {k: args[k] for k in ("img", "txt") if k in args}

    def gathered(self, args: dict, tokens, index) -> dict:
        new = dict(args, img=tokens)
        if index is not None:
            for name in self.token_args:
                value = args.get(name)
                if value is not None and value.ndim >= 2 and value.shape[1] == args["img"].shape[1]:
                    new[name] = value.index_select(1, index)
        return new


class EmbeddedDiTAdapter(BlockAdapter):
    name = "embedded DiT"
    token_args = ()

    def grid(self, x, timestep, kwargs):
        p = self.dm.config.patch_size
        return 1, x.shape[-2] // p, x.shape[-1] // p


class WanAdapter(BlockAdapter):
    name = "Wan"

    def grid(self, x, timestep, kwargs):
        # per-frame timesteps give per-token modulation, and reference latents add tokens in
        # front: the chunk cache then runs whole steps (block policy) instead
        if timestep is not None and timestep.ndim > 1 or kwargs.get("reference_latent") is not None:
            return None
        pt, ph, pw = self.dm.patch_size
        t, h, w = x.shape[-3:]
        return math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw)


class FluxAdapter(BlockAdapter):
    """Flux: double blocks (img, txt) then single blocks on cat(txt, img). Block cache only: the
    single blocks' text tokens make token subsets architecture-specific."""

    name = "Flux"
    supports_chunks = False

    def chain(self):
        return [("double_block", i) for i in range(len(self.dm.double_blocks))] + \
               [("single_block", i) for i in range(len(self.dm.single_blocks))]

    def grid(self, x, timestep, kwargs):
        return None

    def base(self, out):
        import torch

        return torch.cat((out["txt"], out["img"]), 1) if self.dm.single_blocks else out["img"]


class UNetAdapter:
    """SD-family U-Nets (SD1.5, SDXL, ...): the block policy becomes DeepCache-like. The host's
    U-Net has no block replacement, so a skipped call runs the shallow path itself with the host's
    own modules: the first input block, then the last output block on the cached deep feature. The
    deep feature of a full call is read by an output-block patch (`set_model_output_block_patch`)."""

    name = "SD-family UNet"
    deep_cache = True
    supports_chunks = False

    def __init__(self, diffusion_model):
        self.dm = diffusion_model

    def block_count(self) -> int:
        return len(self.dm.input_blocks) + 1 + len(self.dm.output_blocks)

    def last_output_block(self) -> int:
        return len(self.dm.output_blocks) - 1

    def _embed_kwargs(self, kwargs):
        return {"time_context": kwargs.get("time_context"),
                "num_video_frames": kwargs.get("num_video_frames", self.dm.default_num_video_frames),
                "image_only_indicator": kwargs.get("image_only_indicator")}

    def shallow(self, x, timesteps, context, y, options, kwargs):
        """(the first input block's output, the embedding): what every call computes first."""
        from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

        dm = self.dm
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        emb = dm.time_embed(timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(x.dtype))
        for patch in options.get("patches", {}).get("emb_patch", []):
            emb = patch(emb, dm.model_channels, options)
        if dm.num_classes is not None:
            emb = emb + dm.label_emb(y)
        options["block"] = ("input", 0)
        h = forward_timestep_embed(dm.input_blocks[0], x, emb, context, options, **self._embed_kwargs(kwargs))
        return h, emb

    def finish(self, x, shallow, deep, emb, context, options, kwargs):
        """The last output block on cat(deep, shallow), then the output layer."""
        import torch
        from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

        dm = self.dm
        options["block"] = ("output", self.last_output_block())
        h = forward_timestep_embed(dm.output_blocks[-1], torch.cat([deep, shallow], dim=1), emb, context, options, None,
                                   **self._embed_kwargs(kwargs))
        return dm.out(h.type(x.dtype))


def adapter_for(diffusion_model):
    """The adapter for a host diffusion model, or None (the step cache still works on it)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.wan.model import WanModel

    from .embedded import HostDigitDiT

    if isinstance(diffusion_model, HostDigitDiT):
        return EmbeddedDiTAdapter(diffusion_model)
    if isinstance(diffusion_model, WanModel):
        return WanAdapter(diffusion_model)
    if isinstance(diffusion_model, Flux):
        return FluxAdapter(diffusion_model)
    if isinstance(diffusion_model, UNetModel) and not diffusion_model.predict_codebook_ids:
        return UNetAdapter(diffusion_model)
    return None
