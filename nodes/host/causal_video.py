"""The Causal Video Sampler's host side besides the chunk loop: the decoder of its frames, the
context pass's options, and the KV cache and CUDA graphs a run uses or keeps for the next."""

from __future__ import annotations

import torch
from comfy.patcher_extension import WrappersMP

from ...fastgen_core.graphs import ForwardGraphs
from ...fastgen_core.world import KVCache
from .quantize import WRAPPER_KEY as QUANTIZE_WRAPPER_KEY
from .tiny_decoder import frames_as_images, stream_decoder, to_model_space
from .wan_causal import RUN_KEY
from .wan_vae_stream import streaming_decoder


def chunk_decoder(model, vae, tiny_decoder):
    """(`decode(chunk LATENT samples)` -> the chunk's IMAGE frames [B*F, H, W, 3] in 0..1 on the
    decoder's device (the loop brings them over), keeping the decoder's causal state between
    chunks; `frames(latent_frames)` -> the video frames it makes of that many latent frames, or None):
    the tiny decoder when given, else the VAE, else (None, None)."""
    if tiny_decoder is not None:
        if tiny_decoder.latent_channels != model.model.latent_format.latent_channels:
            raise ValueError(f"the tiny decoder takes {tiny_decoder.latent_channels}-channel latents; this model makes "
                             f"{model.model.latent_format.latent_channels} (use taew2_1 for Wan 2.1)")
        tiny = stream_decoder(tiny_decoder)
        return (lambda chunk: frames_as_images(tiny(to_model_space(tiny_decoder, chunk)), to_cpu=False),
                tiny_decoder.output_frames)
    if vae is not None:
        full = streaming_decoder(vae)
        ratio = vae.upscale_ratio  # (frames of latent frames, 8, 8) for video VAEs; a number for image VAEs
        frames = ratio[0] if isinstance(ratio, tuple) and callable(ratio[0]) else None
        return (lambda chunk: frames_as_images(vae.process_output(full(chunk.to(vae.device, vae.vae_dtype)).float()),
                                               to_cpu=False), frames)
    return None, None


def latent_colours(latent_format, samples: torch.Tensor) -> torch.Tensor:
    """Frames [B*T, 8H, 8W, 3] from the latent format's RGB factors (what sampling previews show)."""
    b, _, t, h, w = samples.shape
    if latent_format.latent_rgb_factors is None:
        return torch.full((b * t, 8 * h, 8 * w, 3), 0.5)
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32)
    model_space = latent_format.process_in(samples.float().cpu())  # the space the factors were fitted in
    rgb = torch.einsum("bcthw,cr->bthwr", model_space, factors) + bias
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).reshape(-1, *rgb.shape[2:])
    return rgb.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


QUANTIZED_LOOP_NOTE = ("quantized MODEL: in this loop quantization saves memory, not time (with compile and cuda_graphs fp8 "
                       "runs about as fast as bf16; without them each chunk launches ~1,500 quantized layer calls and is "
                       "slower; figures: benchmarks/RESULTS.md, 'In the causal video loop')")


def quantize_wrappers(model) -> list:
    """The quantize node's APPLY_MODEL wrappers on this MODEL (empty when it is not quantized)."""
    return list(model.wrappers.get(WrappersMP.APPLY_MODEL, {}).get(QUANTIZE_WRAPPER_KEY, []))


def context_options(model) -> dict:
    """transformer_options for the context pass. It runs outside sampling, where the host hands the
    MODEL's wrappers to the model; it gets the causal run's forward wrapper and the quantize wrapper
    (the cached keys must come from the same quantized layers as the denoising passes) and no other:
    a caching wrapper could reuse an earlier output instead of running the blocks whose keys the
    cache needs."""
    options = dict(model.model_options["transformer_options"])
    kept = (RUN_KEY, QUANTIZE_WRAPPER_KEY)
    wrappers = {kind: {key: list(fns) for key, fns in by_key.items() if key in kept} for kind, by_key in model.wrappers.items()}
    options["wrappers"] = {kind: by_key for kind, by_key in wrappers.items() if by_key}
    return options


GRAPH_MODES = ("off", "this run", "kept")
_kept: dict = {}  # at most one entry: what the kept cache and graphs were made for -> [KVCache, ForwardGraphs, runs]


def cache_and_graphs(mode: str, model, latent_shape, chunk_frames: int, sink_frames: int, window_frames: int, compile):
    """The run's KV cache and CUDA graphs (None when off). "kept": the cache's buffers and the graphs
    captured over them outlive the run, for the next run made with the same model (its weights at
    the same addresses, the same patches and wrappers), latent shape and cache settings; any other
    run drops them. The first run that replays graphs an earlier run captured checks its first replay
    against an eager forward (later runs trust them: the key above names what a replay reads)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}; got {mode!r}")

    def new_cache():
        return KVCache(sink_frames=sink_frames, window_frames=window_frames or None, token_dim=1)

    if mode != "kept":
        _kept.clear()  # frees the VRAM a kept run held
        return new_cache(), (ForwardGraphs() if mode == "this run" else None)
    diffusion_model = model.get_model_object("diffusion_model")
    wrappers = tuple((kind, key, tuple(map(id, fns))) for kind, by_key in sorted(model.wrappers.items())
                     for key, fns in sorted(by_key.items()))
    made_for = (id(diffusion_model), tuple(p.data_ptr() for p in diffusion_model.parameters()), model.patches_uuid,
                wrappers, tuple(latent_shape), chunk_frames, sink_frames, window_frames, bool(compile))
    if made_for not in _kept:
        _kept.clear()
        _kept[made_for] = [new_cache(), ForwardGraphs(), 0]
    entry = _kept[made_for]
    cache, graphs = entry[0], entry[1]
    cache.reset(keep_buffers=True)
    if entry[2] == 1:
        graphs.verify_next()
    entry[2] += 1
    return cache, graphs
