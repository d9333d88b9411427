"""The tiny video decoder on the host: its socket type, files, device and the latent space it takes."""

from __future__ import annotations

import functools

import comfy.latent_formats
import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ...fastgen_core.tiny_vae import TinyVideoDecoder
from .devices import tensor_attributes_to

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
    (`host.devices`: no blocking copy per chunk)."""
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
