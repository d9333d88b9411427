"""Streaming decode of a Wan 2.1 video latent: chunk by chunk, as the causal loop finishes them.

The Wan 2.1 VAE decoder is causal in time: the host's own decode runs it one latent frame at a time
with a feature cache of the previous frame's activations (comfy/ldm/wan/vae.py). Keeping that cache
between calls makes decoding a video chunk by chunk give the same frames as one decode of the
whole latent, with the first frames ready as soon as the first chunk is.
"""

from __future__ import annotations

import torch


class WanStreamingDecoder:
    """`decoder(z_chunk)` -> the chunk's video frames [B, 3, F, H, W] in -1..1 (the first latent
    frame gives 1 video frame, every later one 4)."""

    def __init__(self, wan_vae):
        from comfy.ldm.wan.vae import count_conv3d  # the host's own layer count

        if not hasattr(wan_vae, "decoder") or not hasattr(wan_vae, "conv2"):
            raise ValueError(f"streaming decode needs the Wan 2.1 VAE; this is {type(wan_vae).__name__}")
        self.vae = wan_vae
        self.cache = [None] * count_conv3d(wan_vae.decoder)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.conv2(z)
        frames = []
        for i in range(x.shape[2]):
            frames.append(self.vae.decoder(x[:, :, i:i + 1], feat_cache=self.cache, feat_idx=[0]))
        return torch.cat(frames, dim=2)


def streaming_decoder(vae) -> WanStreamingDecoder:
    """For a host VAE object (comfy.sd.VAE): its Wan 2.1 model, on its device and dtype."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([vae.patcher])
    return WanStreamingDecoder(vae.first_stage_model)
