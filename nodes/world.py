"""FastGen Causal Video Sampler: a video generated chunk by chunk on the host's Wan, each chunk
denoised in a few steps while attending to the cached frames before it (CausVid, Self-Forcing).

The loop is `fastgen_core.world`'s (cache with sink + rolling window, first-chunk schedule); the
host's Wan becomes causal through `host.wan_causal` (block patches + attention override), and
each chunk is sampled by the host's own sampler machinery with the student's recipe.
"""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io, ui

from .host import inputs
from .host.causal_video import GRAPH_MODES, CausalVideo
from .host.tiny_decoder import TinyDecoder


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
        video = CausalVideo(model, positive, latent, chunk_frames, steps, first_chunk_steps, window_frames, sink_frames,
                            seed, vae, tiny_decoder, compile, cuda_graphs)
        pbar = comfy.utils.ProgressBar(video.chunk_count)
        for index, preview in video.generate():
            pbar.update_absolute(index + 1, video.chunk_count, preview)
        result, frames, report = video.finish()
        return io.NodeOutput(result, frames, ui=ui.PreviewText(report))
