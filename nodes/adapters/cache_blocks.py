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


def adapter_for(diffusion_model) -> BlockAdapter | None:
    """The adapter for a host diffusion model, or None (the step cache still works on it)."""
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.wan.model import WanModel

    from .embedded import HostDigitDiT

    if isinstance(diffusion_model, HostDigitDiT):
        return EmbeddedDiTAdapter(diffusion_model)
    if isinstance(diffusion_model, WanModel):
        return WanAdapter(diffusion_model)
    if isinstance(diffusion_model, Flux):
        return FluxAdapter(diffusion_model)
    return None
