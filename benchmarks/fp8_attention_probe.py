"""Does PyTorch's SDPA run attention in fp8 (e4m3) on this GPU? Each backend is tried with float8
q / k / v at the Wan chunk's size (4680 queries x 32760 keys, 12 heads of 128), beside the bf16 rate.
Issue #5's speed goals on attention-heavy models need attention in fp8 as well as the GEMMs.

    python benchmarks/fp8_attention_probe.py   # CUDA
"""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

QUERIES, KEYS, HEADS, HEAD_DIM = 4680, 32760, 12, 128


def seconds_per_call(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main():
    attention = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(1, HEADS, QUERIES, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, KEYS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    flop = 4 * QUERIES * KEYS * HEADS * HEAD_DIM
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {QUERIES} queries x {KEYS} keys, {HEADS} heads of {HEAD_DIM}")
    print(f"bf16, SDPA's own choice: {flop / seconds_per_call(lambda: attention(q, k, v)) / 1e12:.0f} TFLOP/s")
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        try:
            with sdpa_kernel([backend]):
                out = attention(q8, k8, v8)
                rate = flop / seconds_per_call(lambda: attention(q8, k8, v8)) / 1e12
            print(f"fp8 on {backend.name}: runs, output {out.dtype}, {rate:.0f} TFLOP/s")
        except RuntimeError as err:
            print(f"fp8 on {backend.name}: no ({str(err).splitlines()[0][:150]})")


if __name__ == "__main__":
    main()
