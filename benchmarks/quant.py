"""bf16 vs fp8 vs int8 through FastGen's quantize node code, side by side in one run, random weights:

(a) a Flux-size DiT block stack: width 3072, 24 heads, MLP 12288, 4608 image tokens (1024x1024);
(b) a Wan-2.1-1.3B block stack on a causal chunk: width 1536, 12 heads, FFN 8960, 4680 query
    tokens (3 latent frames of 832x480) attending to up to 21 latent frames (a KV cache of 18
    earlier frames + the chunk: 32760 keys), cross-attention to 512 text tokens.

Each quantized run is what the nodes run: `fastgen_core.quant.LayerQuantizers` routing the block
Linear layers through modelopt quantizers (FastGen Quantize Model: bf16 originals kept, quantized
codes cached beside them; "compact": FastGen Load Quantized Model's default, the layers held as
codes only), on the GEMM route `choose_route` picks for the device (fp8: torch._scaled_mm on
SM >= 8.9; int8: torch._int_mm on SM >= 8.0; else fake-quant). The activation cast runs fused by
torch.compile on CUDA, as in the nodes; the "eager" rows run it unfused for comparison. Attention
stays bf16 (SDPA). For each run it prints the time per forward, the compute floor (the stack's
FLOPs at the GEMM throughput measured at the start of the run, per precision), the speed ratio
to bf16, the relative error of the output against bf16 and the peak memory.

    python benchmarks/quant.py                          # GPU, full size (an H100 / H200 takes ~1 min)
    python benchmarks/quant.py --graphs                 # + each run replayed as a CUDA graph (GPU work alone)
    python benchmarks/quant.py --device cpu --small     # CPU smoke check (seconds; real GEMM code, no speed meaning)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastgen_core import quant  # noqa: E402


def init_linear(layer: nn.Linear, generator):
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features**0.5)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


class DiTBlock(nn.Module):
    """A Flux-like image-stream block: attention (qkv, proj) + GELU MLP, pre-norm residuals."""

    def __init__(self, dim, heads, mlp, generator):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = init_linear(nn.Linear(dim, 3 * dim), generator)
        self.proj = init_linear(nn.Linear(dim, dim), generator)
        self.fc1 = init_linear(nn.Linear(dim, mlp), generator)
        self.fc2 = init_linear(nn.Linear(mlp, dim), generator)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

    def flops(self, tokens):
        d, m = self.proj.in_features, self.fc1.out_features
        linear = 2 * tokens * d * (3 * d + d + 2 * m)
        return linear, 4 * tokens * tokens * d


class WanChunkBlock(nn.Module):
    """A Wan 2.1 block on a causal chunk: self-attention of the chunk's queries over the cached
    keys / values of the earlier frames + its own, cross-attention to the text, FFN."""

    def __init__(self, dim, heads, ffn, cache_tokens, text_tokens, generator, dtype, device):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        for name in ("q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o"):
            setattr(self, name, init_linear(nn.Linear(dim, dim), generator))
        self.ffn1 = init_linear(nn.Linear(dim, ffn), generator)
        self.ffn2 = init_linear(nn.Linear(ffn, dim), generator)
        shape = (1, heads, cache_tokens, dim // heads)
        self.register_buffer("cache_k", torch.randn(shape, generator=generator).to(device, dtype), persistent=False)
        self.register_buffer("cache_v", torch.randn(shape, generator=generator).to(device, dtype), persistent=False)
        self.register_buffer("text", torch.randn(1, text_tokens, dim, generator=generator).to(device, dtype), persistent=False)

    def heads_first(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        k = torch.cat([self.cache_k, self.heads_first(self.k(h))], dim=2)
        v = torch.cat([self.cache_v, self.heads_first(self.v(h))], dim=2)
        x = x + self.o(F.scaled_dot_product_attention(self.heads_first(self.q(h)), k, v).transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x)
        cross = F.scaled_dot_product_attention(self.heads_first(self.cross_q(h)), self.heads_first(self.cross_k(self.text)),
                                               self.heads_first(self.cross_v(self.text)))
        x = x + self.cross_o(cross.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn2(F.gelu(self.ffn1(self.norm3(x)), approximate="tanh"))

    def flops(self, tokens):
        d, f, keys, text = self.q.in_features, self.ffn1.out_features, self.cache_k.shape[2] + tokens, self.text.shape[1]
        linear = 2 * tokens * d * (6 * d + 2 * f) + 2 * text * d * 2 * d
        return linear, 4 * tokens * keys * d + 4 * tokens * text * d


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def flops(self, tokens):
        parts = [block.flops(tokens) for block in self.blocks]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)


def sizes(small: bool) -> dict:
    if small:
        return {"flux": dict(dim=256, heads=4, mlp=1024, tokens=256, blocks=2),
                "wan": dict(dim=256, heads=2, ffn=768, tokens=240, cache_frames=3, frame_tokens=80, text=32, blocks=2)}
    return {"flux": dict(dim=3072, heads=24, mlp=12288, tokens=4608, blocks=8),
            "wan": dict(dim=1536, heads=12, ffn=8960, tokens=4680, cache_frames=18, frame_tokens=1560, text=512, blocks=30)}


def build(kind: str, cfg: dict, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "flux":
        blocks = [DiTBlock(cfg["dim"], cfg["heads"], cfg["mlp"], generator) for _ in range(cfg["blocks"])]
    else:
        cache = cfg["cache_frames"] * cfg["frame_tokens"]
        blocks = [WanChunkBlock(cfg["dim"], cfg["heads"], cfg["ffn"], cache, cfg["text"], generator, dtype, device)
                  for _ in range(cfg["blocks"])]
    stack = Stack(blocks).to(device, dtype).eval().requires_grad_(False)
    x = torch.randn(1, cfg["tokens"], cfg["dim"], generator=generator).to(device, dtype)
    return stack, x


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_replay(fn, device):
    """`fn` captured once as a CUDA graph (after warm-up on a side stream, as torch's docs do it):
    the replay runs the same kernels with no Python and no launch cost per layer. Returns the
    replay function, or (None, why) when the forward cannot be captured."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, None
    except RuntimeError as err:
        return None, str(err).splitlines()[0][:160]


def graphed_seconds(fn, device, args) -> tuple[float | None, str | None]:
    if not args.graphs or device.type != "cuda":
        return None, None
    replay, why = graph_replay(fn, device)
    return (timed(replay, device, args.warmup, args.iters), None) if replay is not None else (None, why)


def gemm_throughput(device, n: int, warmup: int, iters: int) -> dict[str, float]:
    """FLOP/s of one n x n x n GEMM per precision on this device (the floor's denominator)."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=generator).to(device, torch.bfloat16)
    b = torch.randn(n, n, generator=generator).to(device, torch.bfloat16)
    flop = 2 * n**3
    out = {"bf16": flop / timed(lambda: a @ b.t(), device, warmup, iters)}
    one = torch.ones((), device=device)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    try:
        out["fp8"] = flop / timed(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                                  device, warmup, iters)
    except RuntimeError as err:
        print(f"  (no fp8 GEMM here: {str(err).splitlines()[0][:100]})")
    ai, bi = a.clamp(-127, 127).to(torch.int8), b.clamp(-127, 127).to(torch.int8)
    try:
        out["int8"] = flop / timed(lambda: torch._int_mm(ai, bi.t()), device, warmup, iters)
    except RuntimeError as err:
        print(f"  (no int8 GEMM here: {str(err).splitlines()[0][:100]})")
    return out


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_case(kind, cfg, device, throughput, args) -> list[dict]:
    stack, x = build(kind, cfg, device, torch.bfloat16)
    linear_flop, attention_flop = stack.flops(cfg["tokens"])
    weights = sum(m.weight.numel() for m in quant.linear_layers(stack).values())
    rows = []
    reset_peak(device)
    with torch.no_grad():
        reference = stack(x)
        seconds = timed(lambda: stack(x), device, args.warmup, args.iters)
        graph_seconds, graph_failed = graphed_seconds(lambda: stack(x), device, args)
    rows.append(dict(run="bf16", route="bf16", seconds=seconds, error=0.0, memory=peak_memory(device),
                     graph_seconds=graph_seconds, graph_failed=graph_failed,
                     floor=(linear_flop + attention_flop) / throughput["bf16"],
                     weights=sum(m.weight.nbytes for m in quant.linear_layers(stack).values())))
    runs = [("fp8", False, True, False), ("int8", False, True, False), ("fp8", False, True, True)]
    if device.type == "cuda":  # the same GEMMs with the activation cast left eager (modelopt's five passes)
        runs += [("fp8", False, False, False), ("int8", False, False, False)]
    if not args.skip_compact:
        runs += [("fp8", True, True, False), ("int8", True, True, False)]
    for fmt, compact, fused, static in runs:
        os.environ["FASTGEN_QUANT_COMPILE"] = "1" if fused else "0"
        if compact:  # FastGen Load Quantized Model's default: the layers held as codes, originals dropped
            del stack
            stack, x = build(kind, cfg, device, torch.bfloat16)
        bank = quant.quantize_model(stack, fmt, pattern="blocks.*")
        if static:  # activation ranges calibrated once (FastGen Quantize Model's calibrate): no per-call reduction
            def forward_loop(b=bank, s=stack, i=x):
                with torch.no_grad(), b.installed(s):
                    s(i)
            bank.calibrate(forward_loop)
        if compact:
            quant.compact_layers(stack, bank)
        route, why = quant.choose_route(bank.format, device)
        if device.type == "cpu" and args.small:
            route, why = fmt, f"{fmt} GEMM code on CPU (correctness only, no speed meaning)"
        bank.route = route
        reset_peak(device)
        with torch.no_grad(), bank.installed(stack):
            out = stack(x)
            seconds = timed(lambda s=stack, i=x: s(i), device, args.warmup, args.iters)
            graph_seconds, graph_failed = graphed_seconds(lambda s=stack, i=x: s(i), device, args)
            if args.profile and fused and not compact and fmt == "fp8" and not static:
                profile(lambda s=stack, i=x: s(i), f"{kind} {fmt}")
        gemm = throughput.get(route, throughput["bf16"])
        label = fmt + (" compact" if compact else "") + ("" if fused else " eager") + (" static" if static else "")
        rows.append(dict(run=label, route=why, seconds=seconds, memory=peak_memory(device),
                         graph_seconds=graph_seconds, graph_failed=graph_failed,
                         error=((out.float() - reference.float()).norm() / reference.float().norm()).item(),
                         floor=linear_flop / gemm + attention_flop / throughput["bf16"],
                         cache=bank.cached_bytes(),
                         weights=sum(m.weight.nbytes for m in quant.linear_layers(stack).values())))
        del bank
    print(f"\n({kind}) {describe(kind, cfg)}: {len(quant.linear_layers(stack))} Linear layers, {weights / 1e6:.1f} M weights "
          f"({weights * 2 / 2**20:.0f} MiB bf16); {flop_text(linear_flop)} in GEMMs + {flop_text(attention_flop)} attention "
          "per forward")
    graphs = args.graphs and device.type == "cuda"
    print(f"{'run':13} {'ms':>9} {'floor ms':>9} {'of floor':>8} {'vs bf16':>8} {'rel err':>9} {'weights MiB':>11} "
          f"{'peak GiB':>9}" + (f" {'graph ms':>9} {'of floor':>8} {'vs bf16':>8}" if graphs else "") + "  route")
    base, graph_base = rows[0]["seconds"], rows[0].get("graph_seconds")
    for row in rows:
        memory = f"{row['memory']:.2f}" if row["memory"] is not None else "-"
        weights_mib = (row["weights"] + row.get("cache", 0)) / 2**20
        extra = f" (incl. {row['cache'] / 2**20:.0f} MiB cached codes beside the bf16 originals)" if row.get("cache") else ""
        graph = ""
        if graphs and row.get("graph_seconds") and graph_base:
            g = row["graph_seconds"]
            graph = f" {g * 1e3:9.2f} {row['floor'] / g:8.0%} {graph_base / g:7.2f}x"
        elif graphs:
            graph = f" {'-':>9} {'-':>8} {'-':>8}"
            extra += f" (no CUDA graph: {row.get('graph_failed')})"
        print(f"{row['run']:13} {row['seconds'] * 1e3:9.2f} {row['floor'] * 1e3:9.2f} {row['floor'] / row['seconds']:8.0%} "
              f"{base / row['seconds']:7.2f}x {row['error']:9.2e} {weights_mib:11.0f} {memory:>9}{graph}  {row['route']}{extra}")
    return rows


def profile(fn, label):
    """Where the time of one quantized forward goes, per kernel (torch.profiler, CUDA time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"\nprofile of 3 forwards ({label}), top kernels by CUDA time:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def flop_text(flop: float) -> str:
    return f"{flop / 1e12:.2f} TFLOP" if flop >= 1e11 else f"{flop / 1e9:.2f} GFLOP"


def describe(kind, cfg):
    if kind == "flux":
        return f"Flux-size DiT stack: {cfg['blocks']} blocks, width {cfg['dim']}, MLP {cfg['mlp']}, {cfg['tokens']} tokens"
    frames = cfg["cache_frames"] + cfg["tokens"] // cfg["frame_tokens"]
    return (f"Wan-1.3B-size chunk: {cfg['blocks']} blocks, width {cfg['dim']}, FFN {cfg['ffn']}, {cfg['tokens']} query "
            f"tokens over {frames} latent frames ({cfg['cache_frames'] * cfg['frame_tokens'] + cfg['tokens']} keys), "
            f"{cfg['text']} text tokens")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes: a CPU smoke check in seconds")
    parser.add_argument("--cases", default="flux,wan", help="comma-separated: flux, wan")
    parser.add_argument("--blocks", type=int, default=0, help="blocks per stack (0: flux 8, wan 30; small: 2)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of the fp8 run (CUDA)")
    parser.add_argument("--skip-compact", action="store_true", help="leave out the compact rows")
    parser.add_argument("--graphs", action="store_true", help="also time each run replayed as one CUDA graph (CUDA): "
                        "the GPU work alone, without per-layer Python and launch cost")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    args.iters = args.iters if args.iters is not None else (2 if args.small else 10)
    configs = sizes(args.small)
    if args.blocks:
        for cfg in configs.values():
            cfg["blocks"] = args.blocks

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    capability = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else "-"
    print(f"device {name}, SM {capability}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    throughput = gemm_throughput(device, 256 if args.small else 8192, args.warmup, max(args.iters, 3))
    print("GEMM throughput measured (the floors' denominators): "
          + ", ".join(f"{k} {flop_text(v)}/s" for k, v in throughput.items()))
    for kind in args.cases.split(","):
        run_case(kind.strip(), configs[kind.strip()], device, throughput, args)


if __name__ == "__main__":
    main()
