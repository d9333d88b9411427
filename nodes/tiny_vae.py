"""FastGen Load Tiny Video Decoder / FastGen Tiny Video Decode: Wan latents to frames with a tiny
decoder (`fastgen_core.tiny_vae`, the TAEHV layout), for live previews and the causal loop's
streamed frames, where the full Wan VAE would take about as long as the transformer.
"""

from __future__ import annotations

import functools

import comfy.latent_formats
import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..fastgen_core.tiny_vae import TinyVideoDecoder, load_tiny_decoder
from .adapters.devices import tensor_attributes_to

FOLDER = "vae_approx"
TinyDecoder = io.Custom("FASTGEN_TINY_DECODER")

# the image decoders the host keeps in the same folder (TAESD family): not video decoders
_IMAGE_DECODERS = ("taesd", "taef1")

# latent channels -> the host's latent format whose model space the decoder was trained on
LATENT_FORMATS = {16: comfy.latent_formats.Wan21, 48: comfy.latent_formats.Wan22}


def tiny_decoder_names() -> list[str]:
    return [n for n in folder_paths.get_filename_list(FOLDER) if not n.lower().startswith(_IMAGE_DECODERS)]


def place(decoder: TinyVideoDecoder) -> TinyVideoDecoder:
    """On the host's VAE device in its VAE dtype (bf16 / fp16 on GPUs, fp32 on the CPU)."""
    device = comfy.model_management.vae_device()
    return decoder.to(device=device, dtype=comfy.model_management.vae_dtype(device, [torch.float16, torch.bfloat16, torch.float32]))


def to_model_space(decoder: TinyVideoDecoder, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples (the full VAE's space) in the diffusion model's space, which the tiny
    decoders take."""
    latent_format = LATENT_FORMATS.get(decoder.latent_channels)
    if latent_format is None:
        raise ValueError(f"no latent format known for a {decoder.latent_channels}-channel tiny decoder "
                         f"(known: {sorted(LATENT_FORMATS)} channels, Wan 2.1 / Wan 2.2 5B)")
    if samples.ndim != 5 or samples.shape[1] != decoder.latent_channels:
        raise ValueError(f"this tiny decoder takes video latents with {decoder.latent_channels} channels "
                         f"[B, C, T, H, W]; got {list(samples.shape)}")
    return _latent_format_on(latent_format, samples.device).process_in(samples.float())


@functools.cache
def _latent_format_on(latent_format: type, device: torch.device):
    """One instance of the host's latent format per device, with its mean and std there
    (`adapters.devices`: no blocking copy per chunk)."""
    instance = latent_format()
    tensor_attributes_to(instance, device)
    return instance


def stream_decoder(decoder: TinyVideoDecoder):
    """`decode(model_space_chunk)` -> the chunk's frames [B, 3, F, H, W] in 0..1, chunk after chunk."""
    weight = next(decoder.parameters())
    stream = decoder.stream()
    return lambda latents: stream(latents.to(weight))


def frames_as_images(pixels: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
    """[B, 3, F, H, W] in 0..1 -> IMAGE [B*F, H, W, 3], on the CPU unless `to_cpu` is off."""
    images = pixels.float().movedim(1, -1).reshape(-1, *pixels.shape[-2:], 3)
    return images.cpu() if to_cpu else images


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
