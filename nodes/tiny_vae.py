"""FastGen Load Tiny Video Decoder / FastGen Tiny Video Decode: Wan latents to frames with a tiny
decoder (`fastgen_core.tiny_vae`, the TAEHV layout), for live previews and the causal loop's
streamed frames, where the full Wan VAE would take about as long as the transformer.
"""

from __future__ import annotations

import folder_paths
import torch
from comfy_api.latest import io

from ..fastgen_core.tiny_vae import load_tiny_decoder
from .host.tiny_decoder import FOLDER, TinyDecoder, frames_as_images, place, stream_decoder, tiny_decoder_names, to_model_space


class FastGenLoadTinyVideoDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenLoadTinyVideoDecoder",
            display_name="FastGen Load Tiny Video Decoder",
            category="FastGen/world",
            description="Loads a tiny video decoder in the TAEHV layout from models/vae_approx (taew2_1 for Wan 2.1, "
            "Wan 2.2 14B and Qwen-Image latents; taew2_2 for Wan 2.2 5B): an order of magnitude faster than the "
            "full VAE (figures: benchmarks/RESULTS.md), slightly softer. For live previews and the Causal Video "
            "Sampler's streamed frames.",
            inputs=[io.Combo.Input("decoder_name", options=tiny_decoder_names(),
                                   tooltip="A TAEHV-layout file in models/vae_approx (.safetensors, or a weights-only .pth).")],
            outputs=[TinyDecoder.Output(display_name="tiny_decoder")],
        )

    @classmethod
    def execute(cls, decoder_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, decoder_name)
        return io.NodeOutput(place(load_tiny_decoder(path)))


class FastGenTinyVideoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenTinyVideoDecode",
            display_name="FastGen Tiny Video Decode",
            category="FastGen/world",
            description="Decodes a video LATENT with a tiny decoder, in chunks of latent frames so memory stays small; "
            "the frames equal one decode of the whole latent.",
            inputs=[
                TinyDecoder.Input("tiny_decoder"),
                io.Latent.Input("samples"),
                io.Int.Input("chunk_frames", default=8, min=1, max=256,
                             tooltip="Latent frames decoded at once (more is faster, uses more memory)."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, tiny_decoder, samples, chunk_frames) -> io.NodeOutput:
        latents = to_model_space(tiny_decoder, samples["samples"])
        decode = stream_decoder(tiny_decoder)
        pixels = [decode(latents[:, :, i:i + chunk_frames]).cpu() for i in range(0, latents.shape[2], chunk_frames)]
        return io.NodeOutput(frames_as_images(torch.cat(pixels, dim=2)))
