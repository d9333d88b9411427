"""FastGen Causal Video Sampler: a video generated chunk by chunk on the host's Wan, each chunk
denoised in a few steps while attending to the cached frames before it (CausVid, Self-Forcing).

The loop is `fastgen_core.world`'s (cache with sink + rolling window, first-chunk schedule); the
host's Wan becomes causal through `host.wan_causal` (block patches + attention override), and
each chunk is sampled by the host's own sampler machinery with the student's recipe.
"""

from __future__ import annotations

import math
import time

import comfy.model_management
import comfy.sample
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui
from PIL import Image

from .host import inputs
from .host.causal_loop import FrameSink, causal_chunks
from .host.causal_video import (
    GRAPH_MODES,
    QUANTIZED_LOOP_NOTE,
    cache_and_graphs,
    chunk_decoder,
    context_options,
    latent_colours,
    quantize_wrappers,
)
from .host.conds import model_conds
from .host.recipes import model_recipe, recipe_sigmas
from .host.samplers import plan_sampling, recipe_sampler
from .host.tiny_decoder import TinyDecoder
from .host.wan_causal import ASYNC_ALLOCATOR_NOTE, WanCausalRun, graphs_need_eager_blocks, make_causal


class FastGenCausalVideoSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenCausalVideoSampler",
            display_name="FastGen Causal Video Sampler",
            category="FastGen/world",
            description="Generates a video chunk by chunk with a causal (Self-Forcing / CausVid-style) Wan 2.1 student: "
            "each chunk of latent frames is denoised in a few steps while attending to the cached keys and values of "
            "the frames before it, with a rolling window + sink frames so memory stays flat however long the video.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 MODEL, ideally a causally trained few-step student (Self-Forcing, "
                               "CausVid: load it with Load Diffusion Model); its recipe gives the steps."),
                io.Conditioning.Input("positive", tooltip="The prompt (the loop runs at cfg 1, as the students do)."),
                io.Latent.Input("latent", tooltip="An empty video latent (e.g. Empty Hunyuan / Wan video latent): its frame "
                                "count is the video's length in latent frames."),
                io.Int.Input("chunk_frames", default=3, min=1, max=64, tooltip="Latent frames per chunk (Self-Forcing: 3)."),
                io.Int.Input("steps", default=0, min=0, max=100, tooltip="Denoising steps per chunk; 0 = the model's recipe."),
                io.Int.Input("first_chunk_steps", default=0, min=0, max=100, tooltip="Steps of the first chunk, which has "
                             "no context to lean on; 0 = the same as later chunks."),
                io.Int.Input("window_frames", default=0, min=0, max=1024, tooltip="Latent frames of context kept besides "
                             "the sink (a rolling window); 0 = keep every frame (memory grows with the video)."),
                io.Int.Input("sink_frames", default=3, min=0, max=64, tooltip="The first latent frames, kept in the cache "
                             "for good once the window rolls (attention sink)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True),
                io.Vae.Input("vae", optional=True, tooltip="The Wan 2.1 VAE: each chunk is decoded as soon as it is final "
                             "(the VAE's causal cache kept between chunks, so the frames equal one decode of the whole "
                             "latent) and previewed. Without it, 'frames' shows the latent's preview colours."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile the Wan blocks (attention stays eager, so the cache never "
                                 "recompiles them; on a GPU each FFN's bias and GELU go into its first GEMM). The first "
                                 "run compiles (tens of seconds; seconds once inductor's on-disk cache has it), later "
                                 "runs are faster. Off: exactly the host's eager blocks. Figures: benchmarks/RESULTS.md."),
                io.Combo.Input("cuda_graphs", options=list(GRAPH_MODES), default="off", optional=True,
                               tooltip="Replay the 30 Wan blocks of each forward as one CUDA graph per cache length: "
                               "the CPU stops launching thousands of kernels a step. Same frames. 'this run': captured "
                               "as the run goes and dropped after it; pays for long videos with a window (one graph once "
                               "the window is full), costs time on a short full-context video. 'kept': the graphs and the "
                               "cache's buffers stay in VRAM for the next run with the same model, latent size and cache "
                               "settings, which then captures nothing: the fastest setting, with compile (the first run "
                               "that reuses them checks them against an eager forward). Needs a CUDA GPU with the model "
                               "fully in VRAM; otherwise it turns itself off and says why. Under ComfyUI's default "
                               "cudaMallocAsync allocator the graphs replay eager blocks (start ComfyUI with "
                               "--disable-cuda-malloc for compiled blocks in them)."),
                TinyDecoder.Input("tiny_decoder", optional=True, tooltip="A tiny video decoder (FastGen Load Tiny Video "
                                  "Decoder, taew2_1): streams the frames many times faster than the VAE "
                                  "(benchmarks/RESULTS.md), slightly softer. Used instead of the VAE when both are connected."),
            ],
            outputs=[io.Latent.Output(), io.Image.Output(display_name="frames", tooltip="The video frames, decoded chunk by "
                                                        "chunk (with a VAE or tiny decoder), else the latent preview "
                                                        "colours at 8x.")],
        )

    @classmethod
    def validate_inputs(cls, cuda_graphs: str = "off"):
        return inputs.widget_problem(cls, cuda_graphs=cuda_graphs) or True

    @classmethod
    def execute(cls, model, positive, latent, chunk_frames, steps, first_chunk_steps, window_frames, sink_frames,
                seed, vae=None, tiny_decoder=None, compile=False, cuda_graphs="off") -> io.NodeOutput:
        started = time.perf_counter()
        if model_recipe(model) is None and steps == 0:
            raise ValueError("This MODEL carries no recipe: set steps (a causal student's own count, e.g. 4)")
        # without a recipe: DMD-style multistep sampling at cfg 1, as causal students are trained
        cfg_default, sampler_default = (0.0, "recipe") if model_recipe(model) is not None else (1.0, "multistep_sde")
        model, recipe, steps, cfg, sampler_name, scheduler_name, messages = plan_sampling(model, steps, cfg_default,
                                                                                           sampler_default, "recipe")
        if cfg != 1.0:
            raise ValueError(f"the causal loop samples at cfg 1 (few-step students); this model's recipe asks for cfg {cfg:g}")
        if quantize_wrappers(model):
            messages.append(QUANTIZED_LOOP_NOTE)
        if graphs_need_eager_blocks(compile, cuda_graphs != "off"):
            compile = False
            messages.append(ASYNC_ALLOCATOR_NOTE)
        model_sampling = model.get_model_object("model_sampling")
        sigmas = recipe_sigmas(model_sampling, recipe, steps, scheduler_name)
        first_sigmas = sigmas if first_chunk_steps in (0, len(sigmas) - 1) else \
            recipe_sigmas(model_sampling, recipe, first_chunk_steps, scheduler_name or "simple")
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if samples.ndim != 5:
            raise ValueError(f"the causal loop needs a video latent [B, C, T, H, W], got {list(samples.shape)}")
        total = samples.shape[2]
        chunks = math.ceil(total / chunk_frames)

        if cuda_graphs == "kept":  # kept graphs are keyed by where the weights are: on the GPU, not where they wait
            comfy.model_management.load_models_gpu([model])
        cache, graphs = cache_and_graphs(cuda_graphs, model, samples.shape, chunk_frames, sink_frames, window_frames, compile)
        run = WanCausalRun(model.get_model_object("diffusion_model"), cache, compile=compile, graphs=graphs)
        run.reserve(samples.shape)
        causal = make_causal(model, run)
        device = comfy.model_management.get_torch_device()
        inputs = model_conds(causal.model, positive, "positive", tuple(samples.shape[1:2]) + (chunk_frames,) + tuple(samples.shape[3:]),
                             device)[0]
        previewer = latent_preview.get_previewer(device, model.model.latent_format)
        decode, frames_for = chunk_decoder(model, vae, tiny_decoder)
        frames = FrameSink(samples.shape[0] * frames_for(total) if frames_for is not None else None)
        pbar = comfy.utils.ProgressBar(chunks)
        out, timings = [], []
        for chunk in causal_chunks(causal, run, positive, samples, recipe_sampler(sampler_name, recipe), sigmas, first_sigmas,
                                   chunk_frames, seed, inputs, context_options(causal), decode):
            out.append(chunk.latents)
            timings.append(chunk.seconds)
            if chunk.index == 0:
                first_ready = time.perf_counter() - started
            if chunk.frames is not None:
                frames.add(chunk.frames)
            last = chunk.index + 1 == chunks  # no preview: the node's own output shows at once
            if last or (chunk.frames is None and previewer is None):
                preview = None
            elif chunk.frames is not None:
                preview = ("JPEG", Image.fromarray((chunk.frames[-1].numpy() * 255).round().astype("uint8")), 512)
            else:
                preview = previewer.decode_latent_to_preview_image("JPEG", chunk.latents[:1])
            pbar.update_absolute(chunk.index + 1, chunks, preview)
        result = latent.copy()
        result["samples"] = torch.cat(out, dim=2).to(comfy.model_management.intermediate_device())
        video = frames.result() if decode is not None else latent_colours(model.model.latent_format, result["samples"])
        text = (f"{chunks} chunks of {chunk_frames} latent frames, {len(sigmas) - 1} steps each "
                f"({len(first_sigmas) - 1} for the first); cache holds {cache.frames} frames "
                f"({cache.nbytes() / 2**20:.1f} MiB), {cache.evicted} evicted; first chunk {timings[0]:.2f} s, "
                f"later {sum(timings[1:]) / max(1, len(timings) - 1):.2f} s per chunk")
        shown, unit = (video.shape[0], "frames") if decode is not None else (total, "latent frames")
        seconds = time.perf_counter() - started
        text += (f"; from the node's start: first chunk after {first_ready:.3f} s, {shown} {unit} in {seconds:.2f} s "
                 f"({shown / seconds:.1f} per second)")
        if compile:
            messages.append("blocks compiled by torch.compile" if run.compile else
                            "compile: torch.compile failed here, the blocks ran eagerly (the log says why)")
        if graphs is not None:
            messages.append(graphs.report() + (" (kept in VRAM for the next run)" if cuda_graphs == "kept" and graphs.enabled
                                               else ""))
            if cuda_graphs != "kept":
                graphs.release()  # the graphs were made over this run's cache buffers
        return io.NodeOutput(result, video, ui=ui.PreviewText("\n".join([text, *messages])))
