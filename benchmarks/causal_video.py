"""The causal video loop at Wan-2.1-1.3B size on the host's own Wan code (random weights):
832x480, chunks of 3 latent frames, 4 steps per chunk, 81 video frames, each chunk decoded by the
Wan 2.1 VAE as soon as it is final (streaming decode). Prints FPS, first-chunk latency, peak memory
and the share of the transformer's compute floor reached.

    COMFYUI_PATH=~/ComfyUI python benchmarks/causal_video.py           # GPU, full size
    COMFYUI_PATH=~/ComfyUI python benchmarks/causal_video.py --small   # CPU smoke test
    COMFYUI_PATH=~/ComfyUI python benchmarks/causal_video.py --variants bf16,compile,compile+fp8   # torch.compile'd blocks

The loop is what FastGen Causal Video Sampler runs (nodes/host/wan_causal.py, the same block
patches and attention override, fastgen_core.world.KVCache), driven here without the host's
sampler objects: x0 = x - sigma * v, re-noised with fresh noise (DMD multistep), then one context
pass at sigma 0 per chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastgen_core import sampling, world  # noqa: E402
from fastgen_core.tiny_vae import TinyVideoDecoder  # noqa: E402


def load_host(comfyui: str, cpu: bool):
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    from comfy.ldm.wan.vae import WanVAE

    return comfy.ops, WanModel, WanVAE


def load_host_modules():
    """nodes/host/* as modules of a stand-in package (the pack's own __init__ wants the full host)."""
    for name, path in (("fgpack", REPO), ("fgpack.nodes", os.path.join(REPO, "nodes")),
                       ("fgpack.nodes.host", os.path.join(REPO, "nodes", "host"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    import fastgen_core

    sys.modules["fgpack.fastgen_core"], sys.modules["fgpack.fastgen_core.world"] = fastgen_core, world
    modules = {}
    for name in ("wan_causal", "wan_vae_stream"):
        path = os.path.join(REPO, "nodes", "host", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"fgpack.nodes.host.{name}", path)
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules["wan_causal"], modules["wan_vae_stream"]


def randomize(module, std=0.02):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gamma") or "norm" in name and p.ndim == 1:
                p.fill_(1.0)
            elif p.ndim <= 1:
                p.zero_()
            else:
                p.normal_(0, std if p.ndim == 2 else 1.0 / p[0].numel() ** 0.5)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def rollout(dm, decoder, wan_causal, context, args, device, dtype, chunks, settings):
    """One video: returns (seconds to the first decoded chunk, total seconds, transformer s, decode s, frames).

    Each chunk: 4 denoising steps, its decode, then the context pass that puts its clean keys into
    the cache, which the last chunk skips (no chunk reads it; `--all-context-passes` runs it, as
    the earlier rounds did). The loop waits for each chunk's decode only (the frames are out: the
    first chunk's latency ends there) while the context pass queued behind it runs; earlier rounds
    synchronized after the context pass and after the decode."""
    if args.fresh_graphs and settings.get("graphs") is not None:  # as the node runs: new cache, new graphs
        from fastgen_core.graphs import ForwardGraphs

        settings["graphs"], settings["cache"] = ForwardGraphs(), world.KVCache(token_dim=1)
    cache = settings.setdefault("cache", world.KVCache(token_dim=1))
    cache.reset(keep_buffers=True)  # same buffers every video: graphs captured over them stay valid
    run = wan_causal.WanCausalRun(dm, cache, compile=settings["compile"], graphs=settings.get("graphs"))
    run.reserve((1, 16, args.frames, args.height // 8, args.width // 8))  # buffers allocated once
    options = {"patches_replace": {"dit": {("double_block", i): wan_causal._block_patch(i) for i in range(len(dm.blocks))}},
               "optimized_attention_override": wan_causal.causal_attention, wan_causal.RUN_KEY: run}
    shift = 5.0
    ts = torch.tensor([1.0, 0.75, 0.5, 0.25][: args.steps] + [0.0])
    sigmas = sampling.flow_shift(ts, shift).tolist()
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, 16, args.chunk, args.height // 8, args.width // 8)
    start = time.perf_counter()
    first = decode = 0.0
    frames = 0
    chunk_times = []
    settings["latents"] = []
    with torch.no_grad():
        for i in range(chunks):
            t0 = time.perf_counter()
            x = torch.randn(shape, generator=gen, device=device, dtype=dtype) * sigmas[0]
            run.begin_chunk(shape, device, dtype)
            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                v = dm(x, torch.full((1,), s * 1000.0, device=device), context, transformer_options=options)
                x0 = x - s * v
                x = (1 - s_next) * x0 + s_next * torch.randn(shape, generator=gen, device=device, dtype=dtype)
            settings["latents"].append(x0.float())
            side = None
            if args.decode_stream and device == "cuda":  # decode beside the context pass, on a second stream
                side = settings.setdefault("decode_stream", torch.cuda.Stream())
                side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side) if side else contextlib.nullcontext(), decode_timer(device) as seconds:
                pixels = decoder(x0)
            if side:
                x0.record_stream(side)  # its memory is not handed out again before the decode has read it
            if i + 1 < chunks or args.all_context_passes:  # queued behind the decode: the GPU never waits for us
                run.begin_chunk(shape, device, dtype, write=True)
                dm(x0, torch.zeros(1, device=device), context, transformer_options=options)
                run.end_chunk(args.chunk)
            seconds.wait()  # the chunk's frames are out (a player would show them now)
            t1 = time.perf_counter()
            if not first:
                first = t1 - start
            frames += pixels.shape[2]
            decode += seconds()
            chunk_times.append(round(t1 - t0 - seconds(), 3))
        sync(device)
    print(f"  transformer seconds per chunk: {chunk_times}" + (f"; {run.graphs.report()}" if run.graphs else ""))
    total = time.perf_counter() - start
    return first, total, total - decode, decode, frames, cache


class _Elapsed:
    """The decode's seconds, measured inside the stream of GPU work (CUDA events), and a wait for
    the decode alone: later work queued behind it keeps the GPU busy meanwhile."""

    def __init__(self, device):
        self.cuda = device == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def wait(self):
        if self.cuda:
            self.end.synchronize()

    def __call__(self) -> float:
        return self.begin.elapsed_time(self.end) / 1000.0 if self.cuda else self.seconds


@contextlib.contextmanager
def decode_timer(device):
    elapsed = _Elapsed(device)
    if elapsed.cuda:
        elapsed.begin.record()
    t0 = time.perf_counter()
    yield elapsed
    if elapsed.cuda:
        elapsed.end.record()
    else:
        elapsed.seconds = time.perf_counter() - t0


def floor_tflop(args, layers=30, dim=1536, ffn=8960, text=512):
    """Transformer FLOPs of one video: per forward, linears 2 * params * tokens, self-attention
    4 * q * k * dim, cross-attention 4 * q * text * dim (+ its k/v projections of the text)."""
    tokens = args.chunk * (args.height // 16) * (args.width // 16)
    linear = 2 * tokens * (8 * dim * dim + 2 * dim * ffn) * layers
    total, context = 0.0, 0
    chunks = args.frames // args.chunk
    for i in range(chunks):
        keys = context + tokens
        attention = (4 * tokens * keys * dim + 4 * tokens * text * dim) * layers
        forwards = args.steps + (1 if i + 1 < chunks or args.all_context_passes else 0)  # + the context pass
        total += forwards * (linear + attention)
        context += tokens
    return total / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".comfy")))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=3)
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21 = 81 video frames)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick the VAE's 3D convolution kernels")
    parser.add_argument("--variants", default="bf16",
                        help="comma-separated runs: bf16, fp8, int8, cudnn (SDPA on cuDNN attention), compile (torch.compile of "
                             "the blocks, attention eager), graphs (compile with CUDA graphs), chunkgraphs (the 30 blocks of each "
                             "forward replayed as one CUDA graph per cache length), "
                             "autotune (compile, max-autotune), tiny (the tiny video decoder), "
                             "combined with +")
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of the first chunk(s) per variant")
    parser.add_argument("--profile-chunks", type=int, default=1, help="chunks the profiled video runs (--profile)")
    parser.add_argument("--profile-rows", type=int, default=20, help="kernels listed (--profile)")
    parser.add_argument("--warmup-videos", type=int, default=0,
                        help="whole untimed videos after the 2-chunk warm-up (the first video after a cold compile ran "
                             "25-32 FPS against 33-36 later on the H200)")
    parser.add_argument("--verify", action="store_true",
                        help="compare the timed video's latents with the same video without graphs (chunkgraphs) and with "
                             "the eager blocks (compile)")
    parser.add_argument("--no-fuse-gelu", action="store_true",
                        help="compiled blocks without the FFN's Linear + GELU fused into one GEMM (the earlier rounds)")
    parser.add_argument("--fresh-graphs", action="store_true",
                        help="with chunkgraphs: new graphs and cache for every video, captured as it runs (what the node does "
                             "each run), instead of graphs kept from the warm-up videos")
    parser.add_argument("--decode-stream", action="store_true",
                        help="decode each chunk on a second CUDA stream, beside the next context pass")
    parser.add_argument("--all-context-passes", action="store_true",
                        help="run the last chunk's context pass too (no chunk reads it; rounds before 2026-12-01's fourth did)")
    parser.add_argument("--peak-tflops", type=float, default=750.0, help="bf16 dense peak used for the floor")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ops, WanModel, WanVAE = load_host(args.comfyui, cpu=device == "cpu")
    wan_causal, wan_vae_stream = load_host_modules()
    wan_causal.FUSE_LINEAR_GELU = not args.no_fuse_gelu
    if args.small:
        args.width, args.height, args.frames, args.chunk = 64, 32, 4, 2
        size = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2)
        vae_size = dict(dim=8, dim_mult=[1, 2, 4, 4])
    else:
        args.width, args.height = 832, 480
        size = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
        vae_size = dict(dim=96, dim_mult=[1, 2, 4, 4])
    dm = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, freq_dim=256, text_dim=4096, out_dim=16,
                  cross_attn_norm=True, device=device, dtype=dtype, operations=ops.disable_weight_init, **size)
    randomize(dm)
    vae = WanVAE(z_dim=16, num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], **vae_size)
    vae = vae.to(device=device, dtype=dtype)
    randomize(vae)
    tiny = TinyVideoDecoder(16)
    randomize(tiny)
    tiny = tiny.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def new_decoder(settings):
        """A fresh streaming decoder for one video: the Wan VAE's (exact) or the tiny one."""
        return tiny.stream() if settings["decoder"] == "tiny" else wan_vae_stream.WanStreamingDecoder(vae)
    context = torch.randn(1, 512, 4096, device=device, dtype=dtype)
    chunks = args.frames // args.chunk
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    params = sum(p.numel() for p in dm.parameters()) / 1e9
    print(f"{name}, torch {torch.__version__}, {dtype}; Wan {params:.2f} B params, {args.width}x{args.height}, "
          f"{chunks} chunks x {args.chunk} latent frames, {args.steps} steps + 1 context pass per chunk; streaming decode; "
          f"cudnn.benchmark {args.cudnn_benchmark}")
    if device == "cuda":
        attention_backends(dm, args, dtype)
    tflop = floor_tflop(args, layers=size["num_layers"], dim=size["dim"], ffn=size["ffn_dim"])
    for variant in args.variants.split(","):
        with variant_installed(variant, dm, device, args.small) as settings:
            warm_up = time.perf_counter()
            rollout(dm, new_decoder(settings), wan_causal, context, args, device, dtype, min(2, chunks), settings)
            for _ in range(args.warmup_videos):  # whole videos: every cache length, and compile workers gone quiet
                rollout(dm, new_decoder(settings), wan_causal, context, args, device, dtype, chunks, settings)
            if settings["compile"]:
                print(f"[{variant}] warm-up with compiling {time.perf_counter() - warm_up:.1f} s; {compile_counts()}")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first, total, transformer, decode, frames, cache = rollout(
                dm, new_decoder(settings), wan_causal, context, args, device, dtype, chunks, settings)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            timed = settings["latents"]
            if settings["compile"]:
                print(f"[{variant}] after the timed video: {compile_counts()}; {wan_causal.linear_gelu_pass().fused} Linear+GELU fused")
            if args.verify and settings.get("graphs") is not None:
                graphed, graphs = timed, settings.pop("graphs")
                settings.pop("cache")
                rollout(dm, new_decoder(settings), wan_causal, context, args, device, dtype, chunks, settings)
                difference = max(float((a - b).abs().max()) for a, b in zip(graphed, settings["latents"], strict=True))
                scale = max(float(b.abs().max()) for b in settings["latents"])
                print(f"[{variant}] verify: the graphed video's latents vs the same video without graphs: max |difference| "
                      f"{difference:.3e} (latents up to {scale:.2f}); {graphs.report()}")
            if args.verify and settings["compile"]:
                eager = {"compile": False, "decoder": settings["decoder"]}
                rollout(dm, new_decoder(eager), wan_causal, context, args, device, dtype, chunks, eager)
                errors = [float((a - b).norm() / b.norm()) for a, b in zip(timed, eager["latents"], strict=True)]
                print(f"[{variant}] verify: the timed video's latents vs the eager blocks' (no compile, no graphs), relative "
                      f"L2 per chunk: {' '.join(f'{e:.1e}' for e in errors)}")
            if args.profile and device == "cuda":
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    rollout(dm, new_decoder(settings), wan_causal, context, args, device, dtype, args.profile_chunks, settings)
                print(f"[{variant}] profile of {args.profile_chunks} chunk(s), top by CUDA time:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile_rows, max_name_column_width=90))
        floor_s = tflop / args.peak_tflops
        print(f"[{variant}] video frames {frames}; total {total:.2f} s = {frames / total:.1f} FPS; "
              f"first chunk (denoised + decoded) {first:.3f} s")
        print(f"[{variant}] transformer {transformer:.2f} s ({frames / transformer:.1f} FPS alone), decode {decode:.2f} s "
              f"({decode / frames * 1000:.1f} ms per frame); peak memory {peak:.1f} GiB; KV cache {cache.nbytes() / 2**30:.2f} GiB "
              f"(buffers {cache.allocated_bytes() / 2**30:.2f} GiB)")
        print(f"[{variant}] transformer compute floor (bf16): {tflop:.0f} TFLOP for the video ({tflop / frames:.1f} per frame), "
              f"{floor_s:.2f} s at {args.peak_tflops:g} TFLOP/s; reached {floor_s / transformer:.0%} of it")


def compile_counts() -> str:
    """Dynamo's tally so far: graphs compiled, frames traced, guard failures (each one a recompile)."""
    from torch._dynamo.utils import counters, guard_failures

    return (f"dynamo: {counters['stats']['unique_graphs']} graphs, {counters['frames']['total']} frames traced, "
            f"{sum(map(len, guard_failures.values()))} recompiles")


@contextlib.contextmanager
def variant_installed(variant: str, dm, device, small: bool = False):
    """'bf16' as is; 'fp8' / 'int8': the block Linears through FastGen's quantize code (what FastGen
    Quantize Model installs); 'cudnn': SDPA on cuDNN's attention kernels instead of the default
    choice; 'compile': the blocks through torch.compile (WanCausalRun's switch); 'tiny': decode
    with the tiny video decoder instead of the Wan VAE; combined with '+'. `small` (CPU): fp8 / int8
    run their real GEMM code instead of fake-quant. Yields the rollout's settings."""
    settings = {"compile": False, "decoder": "wan"}
    with contextlib.ExitStack() as stack:
        for part in variant.split("+"):
            if part in ("fp8", "int8"):
                from fastgen_core import quant

                bank = quant.quantize_model(dm, part)
                bank.route, why = quant.choose_route(bank.format, torch.device(device))
                if device == "cpu" and small:  # the GPU's GEMM code (torch._scaled_mm / _int_mm run on CPU): correctness only
                    bank.path, why = part, f"{part} GEMM code on CPU (correctness only, no speed meaning)"
                stack.enter_context(bank.installed(dm))  # compresses the weights now: compiled blocks run the GEMMs in their graphs
                print(f"[{variant}] {bank.quantized_count()} layers quantized: {why}; "
                      f"{bank.compiled_layers} with their GEMM ready to run inside compiled blocks")
            elif part == "cudnn":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
            elif part == "compile":
                settings["compile"] = True
            elif part == "graphs":  # torch.compile's reduce-overhead mode: the compiled pieces as CUDA graphs
                settings["compile"] = "reduce-overhead"
            elif part == "autotune":  # inductor's own GEMM kernels with fused epilogues, tuned per shape
                settings["compile"] = "max-autotune-no-cudagraphs"
            elif part == "chunkgraphs":  # the blocks of each forward as one CUDA graph per cache length (WanCausalRun's graphs)
                from fastgen_core.graphs import ForwardGraphs

                settings["graphs"] = ForwardGraphs()
            elif part == "tiny":
                settings["decoder"] = "tiny"
            elif part != "bf16":
                raise SystemExit(f"unknown variant part {part!r} (bf16, fp8, int8, cudnn, compile, graphs, chunkgraphs, autotune, "
                                 "tiny)")
        yield settings


def attention_backends(dm, args, dtype):
    """One block's self-attention of the last chunk (all cached frames as keys), per SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, dim = dm.num_heads, dm.dim
    tokens = args.chunk * (args.height // 16) * (args.width // 16)
    keys = (args.frames // args.chunk) * tokens
    q = torch.randn(1, heads, tokens, dim // heads, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, heads, keys, dim // heads, device="cuda", dtype=dtype) for _ in range(2))
    flop = 4 * tokens * keys * dim
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                for _ in range(3):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(20):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / 20
            print(f"SDPA {backend.name}: {tokens} queries x {keys} keys, {seconds * 1e3:.2f} ms = {flop / seconds / 1e12:.0f} TFLOP/s")
        except RuntimeError as err:
            print(f"SDPA {backend.name}: not available ({str(err).splitlines()[0][:120]})")

if __name__ == "__main__":
    main()
