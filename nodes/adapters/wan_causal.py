"""The host's Wan 2.1 made block-causal, with a KV cache, without a copy of its model code.

Two host mechanisms do it (comfy/ldm/wan/model.py, v0.3.64):
- a block replacement on every transformer block (`patches_replace["dit"][("double_block", i)]`)
  notes which block runs and hands it the rotary embedding of the chunk's own frames (`rope_encode`
  with `t_start` = frames generated before it), and
- the attention override (`transformer_options["optimized_attention_override"]`) takes each block's
  first attention call, its self-attention, and puts the cached keys and values of the earlier
  frames in front of the chunk's own (or, for a whole sequence at once, adds the block-causal mask).
  Cross-attention calls pass through untouched.

Keys are cached after RoPE, at their absolute frame positions, as Self-Forcing caches them. A
causally trained Wan 2.1 checkpoint (Self-Forcing, CausVid) is an ordinary Wan state dict: load it
with the stock Load Diffusion Model node.
"""

from __future__ import annotations

import torch

from ...fastgen_core.world import KVCache

RUN_KEY = "fastgen_causal_run"


class WanCausalRun:
    """One rollout's state on a Wan model: the cache, the chunk being run and which pass it is.

    It travels in `transformer_options`, which the host deep-copies with every `clone()`: the run is
    shared state, not data, so a copy is the same object.
    """

    def __init__(self, diffusion_model, cache: KVCache):
        self.diffusion_model, self.cache = diffusion_model, cache
        self.freqs = None  # rotary embedding of the current chunk
        self.write = False  # the context pass: keep this chunk's keys and values for the cache
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask = None  # block-causal mask for a whole-sequence forward (the reference path)
        self.layer, self.attention_calls = None, 0

    def __deepcopy__(self, memo):
        return self

    def begin_chunk(self, latent_shape, device, dtype, write: bool = False, first_frame: int | None = None):
        """Before a forward over one chunk of latent frames [B, C, F, H, W]."""
        _, _, frames, h, w = latent_shape
        start = self.cache.frames_seen if first_frame is None else first_frame
        self.freqs = self.diffusion_model.rope_encode(frames, h, w, t_start=start, device=device, dtype=dtype)
        self.write, self.pending, self.mask = write, {}, None

    def begin_sequence(self, latent_shape, chunk_frames: int):
        """Before a forward over a whole sequence of chunks at once, under the block-causal mask."""
        _, _, frames, h, w = latent_shape
        pt, ph, pw = self.diffusion_model.patch_size
        tokens = (h // ph) * (w // pw)
        chunk = (torch.arange(frames // pt) // (chunk_frames // pt)).repeat_interleave(tokens)
        allowed = chunk[None, :] <= chunk[:, None]
        # additive, not boolean: every attention back end of the host adds a float mask the same way
        self.mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        self.freqs, self.write = None, False

    def end_chunk(self, frames: int):
        """After the context pass: the chunk's keys and values join the cache."""
        if self.write:
            layers = len(self.diffusion_model.blocks)
            if sorted(self.pending) != list(range(layers)):
                raise RuntimeError(f"the context pass saw blocks {sorted(self.pending)} of {layers}: a patch skipped blocks")
            self.cache.append([self.pending[i] for i in range(layers)], frames)
        self.write, self.pending = False, {}


def _run(options) -> WanCausalRun | None:
    return (options or {}).get(RUN_KEY)


def _block_patch(index: int):
    def patch(args, extra):
        run = _run(args.get("transformer_options"))
        if run is None:
            return extra["original_block"](args)
        run.layer, run.attention_calls = index, 0
        if run.freqs is not None:
            args = {**args, "pe": run.freqs.to(args["pe"])}
        try:
            return extra["original_block"](args)
        finally:
            run.layer = None

    return patch


def causal_attention(func, q, k, v, *args, **kwargs):
    """The attention override: self-attention of a Wan block sees [cache, chunk] (or the mask)."""
    run = _run(kwargs.get("transformer_options"))
    if run is None or run.layer is None:
        return func(q, k, v, *args, **kwargs)
    run.attention_calls += 1
    if run.attention_calls != 1:  # the block's cross-attention (text, image)
        return func(q, k, v, *args, **kwargs)
    if run.mask is not None:
        return func(q, k, v, *args, **{**kwargs, "mask": run.mask.to(q)})
    if run.write:
        run.pending[run.layer] = (k, v)
    context = run.cache.context(run.layer)
    if context is not None:
        k, v = torch.cat([context[0].to(k), k], dim=1), torch.cat([context[1].to(v), v], dim=1)
    return func(q, k, v, *args, **kwargs)


def make_causal(model, run: WanCausalRun):
    """A clone of a Wan MODEL whose forwards go through `run` (block patches + attention override)."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not hasattr(diffusion_model, "rope_encode") or not hasattr(diffusion_model, "blocks"):
        raise ValueError(f"the causal loop runs Wan 2.1-style models; this is {type(diffusion_model).__name__}")
    causal = model.clone()
    for i in range(len(diffusion_model.blocks)):
        causal.set_model_patch_replace(_block_patch(i), "dit", "double_block", i)
    options = causal.model_options.setdefault("transformer_options", {})
    if "optimized_attention_override" in options:
        raise ValueError("this MODEL already has an attention override (another patch); the causal loop needs its own")
    options["optimized_attention_override"] = causal_attention
    options[RUN_KEY] = run
    return causal
