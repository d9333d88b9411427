"""A tiny streaming video decoder in the TAEHV layout: Wan 2.1 latents to frames in 0.87 ms a frame.

The full Wan 2.1 VAE decodes at 20 ms a video frame on an H200, as long as the causal loop's
transformer takes; this decoder at 0.87 ms on channels-last tensors (benchmarks/video_decoders.py, RESULTS.md). Real-time
world-model demos (Self-Forcing's among them) decode with a tiny autoencoder for that reason. This is our implementation of the decoder
architecture of madebyollin's TAEHV family, so its published weights load as they are: `taew2_1`
(Wan 2.1 / Wan 2.2 14B / Qwen-Image latents; 16 channels), and other base-variant files with their
own channel count and pixel patch size (`taew2_2`: 48 channels, patch 2).

The decoder is 2D convolutions over frames plus "memory blocks" that also see the previous frame's
input at the same block, so time flows forward only. That makes streaming exact: decoding a video
chunk by chunk (each block keeping the last frame it saw) gives the same frames as decoding it
whole. Latents go in in the diffusion model's own space (the host's `latent_format.process_in` of a
LATENT), frames come out in 0..1, [B, 3, F, H, W]; the first latent frame gives one video frame,
every later one four (the raw decoder's first three frames are dropped, as the reference does, to
line up with the full VAE's frames).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

# decoder widths per stage of the base variant, from the latent end
STAGE_WIDTHS = (256, 128, 64, 64)
BLOCKS_PER_STAGE = 3
# index of the last conv: Clamp, conv, ReLU; per stage the blocks, upsample, grow, conv; ReLU
LAST_CONV = 3 + 3 * (BLOCKS_PER_STAGE + 3) + 1


class TinyVaeError(ValueError):
    """A tiny-decoder file that does not fit, with the reason."""

    __module__ = "fastgen"


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to about +-3 (what the decoder was trained on)."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block over [this frame, the previous frame's input to this block]."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * width, width), nn.ReLU(), _conv(width, width), nn.ReLU(), _conv(width, width))

    def forward(self, x, past):
        return F.relu(self.conv(torch.cat([x, past], 1)) + x)


class TGrow(nn.Module):
    """Temporal upsampling: each frame's channels become `stride` consecutive frames."""

    def __init__(self, width: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(width, width * stride, 1, bias=False)

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.conv(x)
        if self.stride == 1:
            return y
        if y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
            return y.reshape(-1, c, h, w)  # [n, stride * c] -> [n * stride, c]: a view
        # channels last: memory is [n, h, w, stride, c]; the frames go in front, still channels last
        frames = y.permute(0, 2, 3, 1).reshape(n, h, w, self.stride, c).permute(0, 3, 1, 2, 4)
        return frames.reshape(n * self.stride, h, w, c).permute(0, 3, 1, 2)


def build_decoder(latent_channels: int = 16, patch_size: int = 1, time_upscale=(False, True, True)) -> nn.Sequential:
    """The decoder as one Sequential whose indices are the published files' key names
    (`decoder.<index>.…`): Clamp, conv, ReLU, then per stage 3 memory blocks, 2x nearest upsampling,
    temporal growth and a conv to the next width; a last ReLU and conv to RGB (x patch²)."""
    w = STAGE_WIDTHS
    layers: list[nn.Module] = [Clamp(), _conv(latent_channels, w[0]), nn.ReLU()]
    for stage in range(3):
        layers += [MemBlock(w[stage]) for _ in range(BLOCKS_PER_STAGE)]
        layers += [nn.Upsample(scale_factor=2), TGrow(w[stage], 2 if time_upscale[stage] else 1),
                   _conv(w[stage], w[stage + 1], bias=False)]
    layers += [nn.ReLU(), _conv(w[3], 3 * patch_size**2)]
    return nn.Sequential(*layers)


class TinyVideoDecoder(nn.Module):
    """Load with `TinyVideoDecoder.from_state_dict(sd)`; decode a whole latent with `decode(z)` or
    chunk by chunk with `stream()`."""

    def __init__(self, latent_channels: int = 16, patch_size: int = 1):
        super().__init__()
        self.latent_channels, self.patch_size = latent_channels, patch_size
        self.decoder = build_decoder(latent_channels, patch_size)
        self.time_upscale = 1
        for layer in self.decoder:
            if isinstance(layer, TGrow):
                self.time_upscale *= layer.stride
        self.frames_to_trim = self.time_upscale - 1

    @classmethod
    def from_state_dict(cls, state_dict: dict, source: str = "the file") -> TinyVideoDecoder:
        """The decoder of a TAEHV-layout state dict (the encoder's keys, if present, are ignored)."""
        decoder = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        if not decoder:
            raise TinyVaeError(f"{source} holds no 'decoder.*' weights: not a TAEHV-style tiny video autoencoder")
        if "0.weight" in decoder:
            raise TinyVaeError(f"{source} is a 'super' TAEHV decoder (its first layer is a 1x1 conv); "
                               "only the base variant (e.g. taew2_1) is supported")
        first, last = decoder.get("1.weight"), decoder.get(f"{LAST_CONV}.weight")
        if first is None or last is None or first.ndim != 4 or last.ndim != 4:
            raise TinyVaeError(f"{source}: the decoder's first or last convolution is missing (keys like "
                               f"{sorted(decoder)[:4]}): not the TAEHV base layout")
        patch = round((last.shape[0] / 3) ** 0.5)
        if 3 * patch**2 != last.shape[0]:
            raise TinyVaeError(f"{source}: the last convolution gives {last.shape[0]} channels, not 3 x patch²")
        model = cls(latent_channels=first.shape[1], patch_size=patch)
        own = model.decoder.state_dict()
        for key, tensor in list(decoder.items()):
            # files trained with temporal growth at every stage keep all of it; a stage that does not
            # grow here takes the last frame's channels (the reference loader's rule)
            if re.fullmatch(r"\d+\.conv\.weight", key) and key in own and tensor.shape[0] > own[key].shape[0]:
                decoder[key] = tensor[-own[key].shape[0]:]
        missing = sorted(set(own) - set(decoder))
        unexpected = sorted(set(decoder) - set(own))
        if missing or unexpected:
            raise TinyVaeError(f"{source} does not fit the TAEHV base decoder: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        for key, tensor in decoder.items():
            if tensor.shape != own[key].shape:
                raise TinyVaeError(f"{source}: decoder.{key} has shape {list(tensor.shape)}, "
                                   f"the layout wants {list(own[key].shape)}")
        model.decoder.load_state_dict(decoder)
        return model.eval().requires_grad_(False)

    def output_frames(self, latent_frames: int) -> int:
        return self.time_upscale * latent_frames - self.frames_to_trim

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """A whole latent [B, C, T, H, W] -> frames [B, 3, 1 + 4 (T - 1), 8H, 8W] in 0..1."""
        return self.stream()(z)

    def stream(self, channels_last: bool | None = None) -> TinyStream:
        return TinyStream(self, channels_last)


class TinyStream:
    """`stream(z_chunk)` decodes the next chunk of latent frames; its frames equal the matching
    frames of one decode of the whole latent. Within a chunk all frames run in parallel."""

    def __init__(self, model: TinyVideoDecoder, channels_last: bool | None = None):
        """`channels_last` (default: on CUDA): run the convolutions on channels-last tensors, as
        cuDNN's fast kernels want them (NCHW input makes it convert before and after every
        convolution: 37 of the decoder's ~120 ms GPU time over an 81-frame 480p video on an H200).
        Same frames either way."""
        self.model = model
        self.channels_last = channels_last
        self.memory: dict[int, torch.Tensor] = {}  # per memory block: the last frame it saw, [B, C, H, W]
        self.frames_out = 0  # raw decoder frames so far (the first `frames_to_trim` are dropped)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        model = self.model
        if z.ndim != 5 or z.shape[1] != model.latent_channels:
            raise TinyVaeError(f"the tiny decoder takes latents [B, {model.latent_channels}, T, H, W]; got {list(z.shape)}")
        weight = model.decoder[1].weight
        batch, frames = z.shape[0], z.shape[2]
        x = z.to(weight).movedim(2, 1).reshape(batch * frames, *z.shape[1:2], *z.shape[3:])
        if self.channels_last if self.channels_last is not None else x.is_cuda:
            if not weight.is_contiguous(memory_format=torch.channels_last):
                model.to(memory_format=torch.channels_last)  # same values: the weights' layout only
            x = x.contiguous(memory_format=torch.channels_last)
        for index, layer in enumerate(model.decoder):
            if isinstance(layer, MemBlock):
                x = layer(x, self._previous_frames(index, x, batch))
            else:
                x = layer(x)
        frames = x.shape[0] // batch
        x = x.reshape(batch, frames, *x.shape[1:])
        if model.patch_size > 1:
            x = F.pixel_shuffle(x.flatten(0, 1), model.patch_size).unflatten(0, (batch, frames))
        trim = max(0, model.frames_to_trim - self.frames_out)
        self.frames_out += frames
        return x[:, trim:].clamp(0, 1).movedim(1, 2)

    def _previous_frames(self, index: int, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Each frame's previous frame at this block: the chunk shifted by one, the first taking the
        last frame of the chunk before (zeros at the start of the video). Rows of x are batch-major
        frames; the result is put together along that axis, so it keeps x's memory layout."""
        frames = x.shape[0] // batch
        before = self.memory.get(index)
        before = torch.zeros_like(x[:batch]) if before is None else before
        self.memory[index] = x[frames - 1::frames]  # each batch item's last frame
        pieces = []
        for b in range(batch):
            pieces += [before[b:b + 1]] + ([x[b * frames:(b + 1) * frames - 1]] if frames > 1 else [])
        return torch.cat(pieces, dim=0)  # (an empty piece would make cat fall back to NCHW)


def load_tiny_decoder(path: str) -> TinyVideoDecoder:
    """A TAEHV-layout file (safetensors, or a weights-only .pth) -> the decoder on the CPU."""
    from .students import StudentFileError, load_student_file

    try:
        state_dict = load_student_file(path).state_dict
    except StudentFileError as err:
        raise TinyVaeError(str(err)) from None
    return TinyVideoDecoder.from_state_dict(state_dict, source=path)
