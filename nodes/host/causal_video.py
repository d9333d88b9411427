"""The Causal Video Sampler's run on the host (`CausalVideo`) and what it is made of besides the
chunk loop: the decoder of its frames, the context pass's options, and the KV cache and CUDA graphs
a run uses or keeps for the next."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import comfy.model_management
import comfy.sample
import latent_preview
import torch
from comfy.patcher_extension import WrappersMP
from PIL import Image

from ...fastgen_core.graphs import ForwardGraphs
from ...fastgen_core.world import KVCache
from .causal_loop import Chunk, FrameSink, causal_chunks
from .conds import model_conds
from .quantize import WRAPPER_KEY as QUANTIZE_WRAPPER_KEY
from .recipes import model_recipe, recipe_sigmas
from .samplers import plan_sampling, recipe_sampler
from .tiny_decoder import frames_as_images, stream_decoder, to_model_space
from .wan_causal import ASYNC_ALLOCATOR_NOTE, RUN_KEY, WanCausalRun, graphs_need_eager_blocks, make_causal
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


class CausalVideo:
    """One run of the Causal Video Sampler, mirroring `fastgen_core.world.rollout` on the host:
    planned from the node's settings when made (recipe and schedules, KV cache and CUDA graphs, the
    causal clone of the MODEL, the prompt's inputs, the frames' decoder), then generated chunk by
    chunk (`generate`), then gathered (`finish`). Everything is checked before the first chunk runs."""

    def __init__(self, model, positive, latent: dict, chunk_frames: int, steps: int, first_chunk_steps: int,
                 window_frames: int, sink_frames: int, seed: int, vae=None, tiny_decoder=None, compile: bool = False,
                 cuda_graphs: str = "off"):
        self.started = time.perf_counter()
        if model_recipe(model) is None and steps == 0:
            raise ValueError("This MODEL carries no recipe: set steps (a causal student's own count, e.g. 4)")
        # without a recipe: DMD-style multistep sampling at cfg 1, as causal students are trained
        cfg_default, sampler_default = (0.0, "recipe") if model_recipe(model) is not None else (1.0, "multistep_sde")
        model, recipe, steps, cfg, sampler_name, scheduler_name, self.messages = plan_sampling(
            model, steps, cfg_default, sampler_default, "recipe")
        if cfg != 1.0:
            raise ValueError(f"the causal loop samples at cfg 1 (few-step students); this model's recipe asks for cfg {cfg:g}")
        if quantize_wrappers(model):
            self.messages.append(QUANTIZED_LOOP_NOTE)
        if graphs_need_eager_blocks(compile, cuda_graphs != "off"):
            compile = False
            self.messages.append(ASYNC_ALLOCATOR_NOTE)
        model_sampling = model.get_model_object("model_sampling")
        self.sigmas = recipe_sigmas(model_sampling, recipe, steps, scheduler_name)
        self.first_sigmas = self.sigmas if first_chunk_steps in (0, len(self.sigmas) - 1) else \
            recipe_sigmas(model_sampling, recipe, first_chunk_steps, scheduler_name or "simple")
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if samples.ndim != 5:
            raise ValueError(f"the causal loop needs a video latent [B, C, T, H, W], got {list(samples.shape)}")
        self.latent, self.samples, self.chunk_frames, self.seed = latent, samples, chunk_frames, seed
        self.total = samples.shape[2]
        self.chunk_count = math.ceil(self.total / chunk_frames)
        self.compile, self.cuda_graphs = compile, cuda_graphs

        if cuda_graphs == "kept":  # kept graphs are keyed by where the weights are: on the GPU, not where they wait
            comfy.model_management.load_models_gpu([model])
        self.cache, self.graphs = cache_and_graphs(cuda_graphs, model, samples.shape, chunk_frames, sink_frames,
                                                   window_frames, compile)
        self.run = WanCausalRun(model.get_model_object("diffusion_model"), self.cache, compile=compile, graphs=self.graphs)
        self.run.reserve(samples.shape)
        self.causal = make_causal(model, self.run)
        self.positive = positive
        device = comfy.model_management.get_torch_device()
        chunk_shape = tuple(samples.shape[1:2]) + (chunk_frames,) + tuple(samples.shape[3:])
        self.inputs = model_conds(self.causal.model, positive, "positive", chunk_shape, device)[0]
        self.latent_format = model.model.latent_format
        self.previewer = latent_preview.get_previewer(device, self.latent_format)
        self.decode, frames_for = chunk_decoder(model, vae, tiny_decoder)
        self.frames = FrameSink(samples.shape[0] * frames_for(self.total) if frames_for is not None else None)
        self.sampler = recipe_sampler(sampler_name, recipe)
        self.out, self.timings, self.first_ready = [], [], None

    def generate(self) -> Iterator[tuple[int, tuple | None]]:
        """Runs the chunks; yields (index, preview for the progress bar or None) as each is final."""
        for chunk in causal_chunks(self.causal, self.run, self.positive, self.samples, self.sampler, self.sigmas,
                                   self.first_sigmas, self.chunk_frames, self.seed, self.inputs,
                                   context_options(self.causal), self.decode):
            self.out.append(chunk.latents)
            self.timings.append(chunk.seconds)
            if chunk.index == 0:
                self.first_ready = time.perf_counter() - self.started
            if chunk.frames is not None:
                self.frames.add(chunk.frames)
            yield chunk.index, self._preview(chunk)

    def _preview(self, chunk: Chunk):
        if chunk.index + 1 == self.chunk_count:  # none: the node's own output shows at once
            return None
        if chunk.frames is not None:
            return "JPEG", Image.fromarray((chunk.frames[-1].numpy() * 255).round().astype("uint8")), 512
        if self.previewer is None:
            return None
        return self.previewer.decode_latent_to_preview_image("JPEG", chunk.latents[:1])

    def finish(self) -> tuple[dict, torch.Tensor, str]:
        """(the LATENT, the IMAGE frames, the node's report) once `generate` is done."""
        result = self.latent.copy()
        result["samples"] = torch.cat(self.out, dim=2).to(comfy.model_management.intermediate_device())
        video = self.frames.result() if self.decode is not None else latent_colours(self.latent_format, result["samples"])
        timings, cache = self.timings, self.cache
        text = (f"{self.chunk_count} chunks of {self.chunk_frames} latent frames, {len(self.sigmas) - 1} steps each "
                f"({len(self.first_sigmas) - 1} for the first); cache holds {cache.frames} frames "
                f"({cache.nbytes() / 2**20:.1f} MiB), {cache.evicted} evicted; first chunk {timings[0]:.2f} s, "
                f"later {sum(timings[1:]) / max(1, len(timings) - 1):.2f} s per chunk")
        shown, unit = (video.shape[0], "frames") if self.decode is not None else (self.total, "latent frames")
        seconds = time.perf_counter() - self.started
        text += (f"; from the node's start: first chunk after {self.first_ready:.3f} s, {shown} {unit} in {seconds:.2f} s "
                 f"({shown / seconds:.1f} per second)")
        messages = list(self.messages)
        if self.compile:
            messages.append("blocks compiled by torch.compile" if self.run.compile else
                            "compile: torch.compile failed here, the blocks ran eagerly (the log says why)")
        if self.graphs is not None:
            kept = self.cuda_graphs == "kept"
            messages.append(self.graphs.report() + (" (kept in VRAM for the next run)" if kept and self.graphs.enabled else ""))
            if not kept:
                self.graphs.release()  # the graphs were made over this run's cache buffers
        return result, video, "\n".join([text, *messages])
