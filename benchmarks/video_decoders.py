"""Wan 2.1 VAE vs the tiny video decoder (TAEHV layout), streaming a 832x480, 81-frame video chunk by
chunk as the causal loop does (7 chunks of 3 latent frames), random weights, side by side in one run:
ms per video frame, the ratio, peak memory.

    COMFYUI_PATH=~/ComfyUI python benchmarks/video_decoders.py          # GPU (bf16)
    COMFYUI_PATH=~/ComfyUI python benchmarks/video_decoders.py --small  # CPU smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.causal_video import load_host, load_host_modules, randomize  # noqa: E402
from fastgen_core.tiny_vae import TinyVideoDecoder  # noqa: E402


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def stream_seconds(make_decoder, latents, chunk, device, repeats):
    """Median seconds to decode the whole latent chunk by chunk with a fresh streaming decoder."""
    times, frames = [], 0
    for _ in range(repeats + 1):  # the first is a warm-up
        decode = make_decoder()
        sync(device)
        start = time.perf_counter()
        frames = sum(decode(latents[:, :, i:i + chunk]).shape[2] for i in range(0, latents.shape[2], chunk))
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), frames


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".comfy")))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _, _, WanVAE = load_host(args.comfyui, cpu=device == "cpu")
    _, wan_vae_stream = load_host_modules()
    width, height, latent_frames, chunk = (64, 32, 4, 2) if args.small else (832, 480, 21, 3)
    vae = WanVAE(z_dim=16, num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dim=96,
                 dim_mult=[1, 2, 4, 4]).to(device=device, dtype=dtype)
    randomize(vae)
    tiny = TinyVideoDecoder(16)
    randomize(tiny)
    tiny = tiny.to(device=device, dtype=dtype).eval().requires_grad_(False)
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, device=device, dtype=dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {dtype}; {width}x{height}, {latent_frames} latent frames in chunks of {chunk}, "
          f"median of {args.repeats}")
    rows = []
    for label, make in (("Wan 2.1 VAE (streaming, exact)", lambda: wan_vae_stream.WanStreamingDecoder(vae)),
                        ("tiny decoder (TAEHV layout)", tiny.stream)):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            seconds, frames = stream_seconds(make, latents, chunk, device, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        rows.append((label, seconds, frames, peak))
    base = rows[0][1]
    for label, seconds, frames, peak in rows:
        print(f"{label:32} {frames} frames in {seconds:.3f} s = {seconds / frames * 1e3:6.2f} ms per frame "
              f"({frames / seconds:6.1f} FPS), {base / seconds:5.1f}x the VAE; peak memory {peak:.2f} GiB")


if __name__ == "__main__":
    main()
