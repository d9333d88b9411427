"""One DMD2 iteration on a Wan-2.1-1.3B-sized model (random weights) at 480p latent size:
seconds per iteration and peak GPU memory, our single-copy DMD (student and fake score = two LoRAs
on one frozen base) against modelopt's default (`create_fake_score` deep-copies the teacher and
trains the copy in full), with and without gradient checkpointing. Same run, same inputs.

    python benchmarks/distill.py                 # GPU: 832x480, 81 frames (21 latent frames)
    python benchmarks/distill.py --small         # CPU smoke test: a tiny model and latent

The network is a standalone Wan-2.1-shaped DiT (dim 1536, 30 blocks, 12 heads, FFN 8960, text
context 512 x 4096, patch 1x2x2: 1.4 B parameters, 32,760 video tokens at 480p) built here so that
the benchmark needs no ComfyUI. Each iteration is what FastGen DMD Distill runs: a fake-score
update, plus on student iterations (every `update_ratio`) the student update with backward
simulation, teacher CFG (2 forwards) and the fake score's prediction.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen_core import distill  # noqa: E402


class WanLikeBlock(nn.Module):
    def __init__(self, dim, heads, ffn):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_q, self.cross_k, self.cross_v, self.cross_o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def attention(self, q, k, v):
        b, n, d = q.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, d)

    def forward(self, x, e, context):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).chunk(6, dim=1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.o(self.attention(self.norm_q(self.q(h)), self.norm_k(self.k(h)), self.v(h)))
        h = self.norm3(x)
        x = x + self.cross_o(self.attention(self.cross_q(h), self.cross_k(context), self.cross_v(context)))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.ffn(h)


class WanLikeDiT(nn.Module):
    """Wan 2.1's layout and sizes (no RoPE: elementwise, negligible in time and memory here)."""

    def __init__(self, dim=1536, depth=30, heads=12, ffn=8960, channels=16, text_dim=4096, patch=(1, 2, 2)):
        super().__init__()
        self.dim, self.patch, self.channels = dim, patch, channels
        self.patch_embed = nn.Linear(channels * math.prod(patch), dim)
        self.text_embed = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_project = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanLikeBlock(dim, heads, ffn) for _ in range(depth))
        self.head = nn.Linear(dim, channels * math.prod(patch))

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        dtype = self.patch_embed.weight.dtype  # like the host's apply_model: compute in the weights' dtype
        x = hidden_states.to(dtype)
        b, c, t, h, w = x.shape
        pt, ph, pw = self.patch
        tokens = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        tokens = self.patch_embed(tokens.reshape(b, -1, c * pt * ph * pw))
        freqs = torch.exp(-math.log(10000) * torch.arange(128, device=x.device) / 128)
        angles = timestep.float().reshape(-1, 1) * 1000 * freqs
        e = self.time_embed(torch.cat([angles.cos(), angles.sin()], dim=-1).to(x.dtype))
        modulation = self.time_project(e).view(b, 6, self.dim)
        context = self.text_embed(encoder_hidden_states.to(dtype))
        for block in self.blocks:
            tokens = block(tokens, modulation, context)
        out = self.head(tokens).view(b, t // pt, h // ph, w // pw, c, pt, ph, pw)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, t, h, w).to(hidden_states.dtype)


def block_linears(name, module):
    return isinstance(module, nn.Linear) and ".blocks." in f".{name}"


def build(variant, args, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: 1.4 B parameters take long on the host CPU
        net = WanLikeDiT(**args.model).to(dtype=dtype)
    fake_score = None
    if variant == "deep-copied fake score":
        from modelopt.torch.fastgen import create_fake_score

        net.requires_grad_(False)
        fake_score = create_fake_score(net)  # modelopt's default: a full trainable copy of the teacher
        switch, adapters = distill.attach_lora(net, names=(distill.STUDENT,), rank=args.rank, targets=block_linears)
    else:
        switch, adapters = distill.attach_lora(net, rank=args.rank, targets=block_linears)
    for group in adapters.values():
        for adapter in group.values():
            adapter.to(dtype)
    if args.checkpointing:
        distill.enable_gradient_checkpointing(net, switch)
        if fake_score is not None:
            distill.enable_gradient_checkpointing(fake_score, distill.AdapterSwitch())
    text = torch.randn(2, *args.text, device=device, dtype=dtype)

    def conditions(batch, generator):
        return text[:1].expand(batch, -1, -1), text[1:].expand(batch, -1, -1)

    settings = distill.DistillSettings(steps=4, timesteps=[0.999, 0.9375, 0.8333, 0.625], batch=1, student_update_freq=2,
                                       sample_shape=args.latent, time_dist="shifted", pred_type="flow")
    return distill.DMDTrainer(net, switch, adapters, settings, conditions, fake_score=fake_score)


def measure(variant, args, device, dtype):
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = None
    try:
        trainer = build(variant, args, device, dtype)
        base_params = sum(p.numel() for p in trainer.net.parameters())
        trainable = sum(p.numel() for p in trainer.student.parameters()) + sum(p.numel() for p in trainer.fake_score.parameters())
        times = {"student": [], "fake": []}
        for i in range(2 + 2 * args.repeats):  # iteration 0, 2, 4 ... update the student too
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times["student" if i % 2 == 0 else "fake"].append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        result = dict(params=base_params, trainable=trainable, student=min(times["student"]), fake=min(times["fake"]), peak=peak)
    except torch.OutOfMemoryError:
        result = None
    finally:
        trainer = None  # noqa: F841
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a tiny model and latent (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--ours-checkpointed", action="store_true",
                        help="only single-copy with gradient checkpointing (what FastGen DMD Distill runs)")
    cli = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not cli.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" or cli.small else torch.float32
    if cli.small:
        cli.model, cli.latent, cli.text = dict(dim=128, depth=2, heads=2, ffn=256, text_dim=64), (16, 3, 8, 8), (16, 64)
    else:
        cli.model, cli.latent, cli.text = {}, (16, 21, 60, 104), (512, 4096)
    tokens = math.prod(cli.latent[1:]) // 4
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {dtype}; latent {cli.latent} = {tokens} tokens; LoRA rank {cli.rank}; "
          f"batch 1; 4-step student, update ratio 2; best of {cli.repeats}")
    print(f"{'variant':34s} {'ckpt':>5s} {'base params':>12s} {'trainable':>10s} {'student it':>11s} {'fake it':>8s} {'peak GiB':>9s}")
    rows = {}
    for checkpointing in ((True,) if cli.ours_checkpointed else (False, True)):
        cli.checkpointing = checkpointing
        for variant in (("single-copy (ours)",) if cli.ours_checkpointed else ("single-copy (ours)", "deep-copied fake score")):
            r = measure(variant, cli, device, dtype)
            rows[variant, checkpointing] = r
            if r is None:
                print(f"{variant:34s} {str(checkpointing):>5s} {'out of memory':>56s}")
            else:
                print(f"{variant:34s} {str(checkpointing):>5s} {r['params'] / 1e9:11.2f}B {r['trainable'] / 1e6:9.1f}M "
                      f"{r['student']:10.2f}s {r['fake']:7.2f}s {r['peak']:9.1f}", flush=True)
    for checkpointing in (False, True):
        ours, theirs = rows.get(("single-copy (ours)", checkpointing)), rows.get(("deep-copied fake score", checkpointing))
        if ours and theirs and device == "cuda":
            print(f"checkpointing {checkpointing}: single copy saves {theirs['peak'] - ours['peak']:.1f} GiB "
                  f"({theirs['peak'] / ours['peak']:.2f}x less peak memory); student iteration "
                  f"{theirs['student'] / ours['student']:.2f}x, fake iteration {theirs['fake'] / ours['fake']:.2f}x the speed")


if __name__ == "__main__":
    main()
