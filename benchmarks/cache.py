"""FastGen Cache against the host's EasyCache, in one host process, same seeds (#6).

    COMFYUI_PATH=/root/ComfyUI PYTHONPATH=. python benchmarks/cache.py [--digits 20] [--repeats 2]
    COMFYUI_PATH=/root/ComfyUI PYTHONPATH=. python benchmarks/cache.py --overhead [--small]

Default: the embedded teacher through the host's own sampling (`nodes.common_ksampler`: euler,
simple, 32 steps, cfg 3), uncached, then under EasyCache and under each of our policies at a sweep
of thresholds. Per run: wall-clock speedup (best of `--repeats`, runs interleaved so machine load
hits all alike), model-call and block skips, PSNR against the uncached images of the same seed,
and the classifier's conditional accuracy. Writes the speed-vs-PSNR curve as a PNG (PIL) and the
numbers as JSON next to it (`--out`). Then the chunk cache on a synthetic mostly-static clip: a
static digit background with a moving square, each frame noised with the same noise and denoised by
one model call (live video-to-video): how many chunks it skips and the error.

`--overhead`: the cache logic's cost when nothing is skipped (threshold 0) on a random Wan at 1.3B
size (30 blocks, dim 1536, 832x480, 21 latent frames) through the host's own model code: the step
time uncached vs with each policy attached. `--small` shrinks it to CPU size (2 blocks, dim 256).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import statistics
import sys
import time
import types

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastgen_core import cache as core_cache  # noqa: E402
from fastgen_core import eval as metrics  # noqa: E402
from fastgen_core.networks import NULL_CLASS, class_conditioning  # noqa: E402
from fastgen_core.train import TEACHER_PATH  # noqa: E402

STEPS, CFG, SEED = 32, 3.0, 0
EASYCACHE_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
OUR_SWEEP = {
    "step": [0.01, 0.02, 0.03, 0.05, 0.1, 0.2],
    "block": [0.05, 0.1, 0.2, 0.4],
    "chunk": [0.1, 0.2, 0.4],
}
PROFILE_SWEEP = [0.02, 0.05, 0.1, 0.2]  # the step policy deciding from a calibration profile (another seed)
STEP_MAX_SKIPS = 6  # the step policy's sweep lets up to 6 skips in a row (node default 4)


class _InertModule(types.ModuleType):
    """A module whose every public attribute is an empty class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {})
        setattr(self, name, value)
        return value


class _InertPyAV(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for PyAV (`av` and its submodules). The lent GPU's image has no PyAV, and its
    36 MB wheel does not fit beside the host in what a device call may carry; the host imports it
    at start-up for its video nodes (type annotations and isinstance checks), which the benchmark
    never runs. Used only when `import av` fails."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "av" or fullname.startswith("av."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _InertModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def stand_in_for_missing_pyav():
    try:
        import av  # noqa: F401
    except ImportError:
        print("PyAV is not installed: an inert stand-in lets the host's video modules import (nothing here decodes video)")
        sys.meta_path.insert(0, _InertPyAV())


def load_host(comfyui: str, cpu: bool = True):
    """The host in this process (no server) and the pack as a package, as ComfyUI imports it."""
    sys.path.insert(0, comfyui)
    stand_in_for_missing_pyav()
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    import utils.install_util  # noqa: F401  (puts comfy/ on the path the way main.py does)

    spec = importlib.util.spec_from_file_location("fastgen_pack", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fastgen_pack"] = pack
    spec.loader.exec_module(pack)
    import comfy_extras.nodes_easycache as easycache
    from fastgen_pack.nodes import cache as cache_nodes
    from fastgen_pack.nodes.host.embedded import load_digit_model

    import nodes as host_nodes

    fix_easycache_batching(easycache)
    return types.SimpleNamespace(nodes=host_nodes, easycache=easycache, cache=cache_nodes, load_digit_model=load_digit_model)


def fix_easycache_batching(easycache):
    """The host's EasyCache (v0.3.64) adds every conditioning's cached diff to the whole batch
    (`x += diff` without slicing), which raises, or silently mixes cond and uncond, as soon as CFG
    batches them (issue #9). Compared as is it cannot run here, so the benchmark gives it the
    obvious fix: each batch slice gets its own conditioning's diff. Its decisions are untouched."""

    def apply_cache_diff(self, x, uuids):
        if self.first_cond_uuid in uuids:
            self.total_steps_skipped += 1
        size = x.shape[0] // len(uuids)
        return torch.cat([x[i * size:(i + 1) * size] + self.uuid_cache_diffs[u].to(x.device) for i, u in enumerate(uuids)])

    easycache.EasyCacheHolder.apply_cache_diff = apply_cache_diff


def easycache_model(host, model, threshold):
    return host.easycache.EasyCacheNode.execute(model, threshold, 0.15, 0.95, False).result[0]


def sample(host, model, positive, negative, digits, seed=SEED):
    latent = {"samples": torch.zeros(digits, 3, 32, 32)}
    return host.nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "simple", positive, negative, latent)[0]["samples"]


def calibrated(host, model, positive, negative, digits):
    """The model with a change profile measured by Calibrate Cache's code on another seed."""
    profile = host.cache.calibrate(model, lambda m: sample(host, m, positive, negative, digits, seed=SEED + 1))
    m = model.clone()
    m.model_options[host.cache.PROFILE_OPTION] = [profile]
    return m


class EasyCacheLog(logging.Handler):
    """EasyCache reports its skips only in the log ("EasyCache - skipped 12/32 steps")."""

    def __init__(self):
        super().__init__()
        self.skipped = None

    def emit(self, record):
        match = re.search(r"EasyCache - skipped (\d+)/", record.getMessage())
        if match:
            self.skipped = int(match.group(1))


def skipped_work(host, name: str, easy_log: EasyCacheLog) -> tuple[int, float]:
    """(model calls skipped, fraction of block work skipped) of the last run."""
    if name == "uncached":
        return 0, 0.0
    if name.startswith("EasyCache"):
        return easy_log.skipped, 0.0
    stats = host.cache.LAST_STATS
    if stats.get("chunks"):  # chunk-blocks skipped, as a share of all block work (the first block always runs)
        return stats["steps_skipped"], stats["chunks_skipped"] / stats["chunks"] * (1 - stats["calls"] / stats["blocks"])
    return stats["steps_skipped"], stats["blocks_skipped"] / stats["blocks"] if stats.get("blocks") else 0.0


def compare(args):
    host = load_host(args.comfyui)
    model = host.load_digit_model(TEACHER_PATH)
    labels = torch.arange(args.digits) % 10
    positive = [[class_conditioning(labels), {}]]
    negative = [[class_conditioning([NULL_CLASS] * len(labels)), {}]]
    classifier = metrics.load_classifier()

    methods = [("uncached", model)]
    methods += [(f"EasyCache {t:g}", easycache_model(host, model, t)) for t in EASYCACHE_THRESHOLDS]
    for policy, thresholds in OUR_SWEEP.items():
        for t in thresholds:
            config = core_cache.CacheConfig(policy=policy, threshold=t, max_skips=STEP_MAX_SKIPS if policy == "step" else 4)
            methods.append((f"{policy} {t:g}", host.cache.apply_cache(model, config)))
    profiled = calibrated(host, model, positive, negative, args.digits)
    for t in PROFILE_SWEEP:
        methods.append((f"step+profile {t:g}", host.cache.apply_cache(profiled, core_cache.CacheConfig(policy="step", threshold=t,
                                                                                                  max_skips=STEP_MAX_SKIPS))))

    times = {name: [] for name, _ in methods}
    walls = {name: [] for name, _ in methods}
    results = {}
    easy_log = EasyCacheLog()
    logging.getLogger().addHandler(easy_log)
    logging.getLogger().setLevel(logging.INFO)
    sample(host, model, positive, negative, 2)  # warm-up: first-call costs off the clock
    for _ in range(args.repeats):
        for name, m in methods:  # interleaved: machine load hits every method alike
            t0, c0 = time.perf_counter(), time.process_time()
            out = sample(host, m, positive, negative, args.digits)
            times[name].append(time.process_time() - c0)
            walls[name].append(time.perf_counter() - t0)
            results[name] = (out, skipped_work(host, name, easy_log))
    reference = results["uncached"][0]
    base, base_wall = min(times["uncached"]), min(walls["uncached"])
    rows = []
    for name, _ in methods:
        out, (skips, block_fraction) = results[name]
        rows.append({
            "method": name, "seconds": min(times[name]), "speedup": base / min(times[name]),
            "wall_seconds": min(walls[name]), "wall_speedup": base_wall / min(walls[name]),
            "psnr": metrics.psnr(out, reference) if name != "uncached" else float("inf"),
            "accuracy": metrics.conditional_accuracy(classifier, out, labels),
            "calls_skipped": skips, "block_work_skipped": block_fraction,
            # the work left, as a bound the measured speedup should stay under (cache overhead aside)
            "work_speedup": STEPS / (STEPS - skips) / (1 - block_fraction) if skips is not None else None,
        })
    return rows


def print_table(rows):
    print(f"{'method':<17} {'CPU s':>7} {'speedup':>8} {'wall s':>7} {'wall x':>7} {'work x':>7} {'PSNR dB':>8} {'accuracy':>9} "
          f"{'calls skipped':>14} {'block work skipped':>19}")
    for r in rows:
        skips = f"{r['calls_skipped']}/{STEPS}"
        work = f"{r['work_speedup']:.2f}x" if r["work_speedup"] else "?"
        print(f"{r['method']:<17} {r['seconds']:>7.2f} {r['speedup']:>7.2f}x {r['wall_seconds']:>7.2f} "
              f"{r['wall_speedup']:>6.2f}x {work:>7} "
              f"{r['psnr']:>8.2f} {100 * r['accuracy']:>8.1f}% "
              f"{skips:>14} {100 * r['block_work_skipped']:>18.0f}%")


# ----------------------------------------------------------------------------- the curve as a PNG


def plot(rows, path):
    """PSNR against wall-clock speedup, one polyline per method family, drawn with PIL."""
    from PIL import Image, ImageDraw

    families = {}
    for r in rows:
        if r["method"] == "uncached":
            continue
        family = r["method"].rsplit(" ", 1)[0]
        families.setdefault(family, []).append((r["speedup"], min(r["psnr"], 60.0)))
    colors = {"EasyCache": (200, 40, 40), "step": (30, 90, 200), "block": (30, 150, 60), "chunk": (150, 60, 170),
              "step+profile": (240, 150, 20)}
    w, h, margin = 720, 480, 60
    xs = [p[0] for pts in families.values() for p in pts] + [1.0]
    ys = [p[1] for pts in families.values() for p in pts]
    x_lo, x_hi = 0.8, max(xs) * 1.05
    y_lo, y_hi = max(min(ys) - 2, 0), max(ys) + 2
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)

    def to_px(x, y):
        return (margin + (x - x_lo) / (x_hi - x_lo) * (w - 2 * margin), h - margin - (y - y_lo) / (y_hi - y_lo) * (h - 2 * margin))

    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    for i in range(6):
        x = x_lo + (x_hi - x_lo) * i / 5
        y = y_lo + (y_hi - y_lo) * i / 5
        px, _ = to_px(x, y_lo)
        _, py = to_px(x_lo, y)
        draw.line([px, h - margin, px, h - margin + 5], fill="black")
        draw.text((px - 12, h - margin + 8), f"{x:.1f}x", fill="black")
        draw.line([margin - 5, py, margin, py], fill="black")
        draw.text((8, py - 6), f"{y:.0f}", fill="black")
    draw.text((w // 2 - 110, h - 22), "speedup vs uncached (CPU time of the run)", fill="black")
    draw.text((8, 20), "PSNR vs uncached (dB; identical images drawn at 60)", fill="black")
    draw.text((margin + 10, 8), f"embedded teacher, euler {STEPS} steps, cfg {CFG:g}: EasyCache vs FastGen Cache", fill="black")
    for k, (family, points) in enumerate(families.items()):
        color = colors.get(family, (0, 0, 0))
        pts = [to_px(x, y) for x, y in sorted(points)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.rectangle([w - margin - 110, margin + 10 + 18 * k, w - margin - 98, margin + 22 + 18 * k], fill=color)
        draw.text((w - margin - 92, margin + 9 + 18 * k), family, fill="black")
    image.save(path)


# ----------------------------------------------------------------------------- synthetic static clip


def static_clip(frames: int = 8, size: int = 64):
    """A mostly-static clip in model space: a fixed digit-like pattern, a 12x12 square moving right."""
    gen = torch.Generator().manual_seed(0)
    background = (torch.rand(1, 3, size // 8, size // 8, generator=gen) * 2 - 1)
    background = torch.nn.functional.interpolate(background, size=(size, size), mode="bilinear", align_corners=False)
    clip = []
    for f in range(frames):
        frame = background.clone()
        x0 = 4 + 3 * f
        frame[:, :, 26:38, x0 : x0 + 12] = 1.0
        clip.append(frame)
    return torch.cat(clip)


def chunk_clip_benchmark(threshold: float = 0.05, sigma: float = 0.5, chunk_tokens: int = 2):
    """The chunk cache over a live clip: per frame, which chunks it skipped against which chunks
    really did not change since the previous frame (pixels equal), and the error of the output."""
    from fastgen_core import checkpoint

    net, _ = checkpoint.load_network(TEACHER_PATH)
    net = net.float()
    clip = static_clip()
    noise = torch.randn(1, *clip.shape[1:], generator=torch.Generator().manual_seed(1))
    weights = class_conditioning([NULL_CLASS])[:, 0]
    s = torch.tensor([sigma])
    config = core_cache.CacheConfig(policy="chunk", threshold=threshold, chunk_tokens=chunk_tokens, max_skips=100)
    frames = len(clip)
    # one stream over the frames of a live video: frame f is "step" f of a window that lets every
    # frame but the first reuse
    counter = iter(range(frames))

    class FrameRun(core_cache.CacheRun):
        def step_of(self, value):
            return next(counter), frames + 1

    run = FrameRun(config, [sigma] * (frames + 1) + [0.0])
    p = net.config.patch_size * chunk_tokens  # chunk side in pixels
    static_skipped = static_ran = static_total = moving_run = moving_total = 0
    errors = []
    with torch.no_grad():
        for f in range(frames):
            x = sigma * noise + (1 - sigma) * clip[f : f + 1]
            exact = net(x, s, weights)
            cached = core_cache.digit_forward(net, x, s, weights, run)
            errors.append(metrics.psnr(x - sigma * cached, x - sigma * exact))
            if f == 0:
                continue
            state = run.streams["default"]
            changed = (clip[f] != clip[f - 1]).any(0).float()
            changed = torch.nn.functional.max_pool2d(changed[None, None], p).reshape(-1) > 0
            # reused: the chunk's output came from the cache; ran: it went through the later blocks
            # (as a changed chunk, or as attention context around one, whose cached output is kept)
            reused = {core_cache.Mode.SKIP: torch.ones_like(changed), core_cache.Mode.COMPUTE: torch.zeros_like(changed)}.get(state.mode)
            ran = ~reused if reused is not None else state.run_chunks.to(changed.device)
            reused = state.skip_chunks.to(changed.device) if reused is None else reused
            static_total += int((~changed).sum())
            static_skipped += int((reused & ~changed).sum())
            static_ran += int((ran & ~changed).sum())
            moving_total += int(changed.sum())
            moving_run += int((~reused & changed).sum())
    return {"frames": frames, "threshold": threshold, "chunk_pixels": p,
            "static_chunks_reused": f"{static_skipped}/{static_total}", "static_chunks_run_as_context": f"{static_ran}/{static_total}",
            "moving_chunks_recomputed": f"{moving_run}/{moving_total}",
            "psnr_vs_uncached_min": round(min(errors[1:]), 2), "psnr_vs_uncached_mean": round(statistics.mean(errors[1:]), 2)}


# ----------------------------------------------------------------------------- overhead on a Wan


def overhead(args):
    """Step time uncached vs each policy at threshold 0 (nothing skipped) on a random Wan."""
    cuda = torch.cuda.is_available()
    host = load_host(args.comfyui, cpu=not cuda)
    import comfy.sd

    sys.path.insert(0, os.path.join(REPO, "tests", "host"))
    from tiny_models import tiny_wan_state_dict

    if args.small:
        size = dict(dim=256, layers=2, ffn_dim=1024)
        latent_shape, text_tokens, steps = (1, 16, 3, 8, 8), 16, 10
    else:  # Wan 2.1 1.3B: dim 1536, 12 heads, 30 blocks, ffn 8960; 832x480x81 -> latent 21x60x104
        size = dict(dim=1536, layers=30, ffn_dim=8960)
        latent_shape, text_tokens, steps = (1, 16, 21, 60, 104), 512, 10
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(tiny_wan_state_dict(**size, dtype=dtype))
    print(f"random Wan {size} loaded in {time.perf_counter() - t0:.1f}s on {'cuda' if cuda else 'cpu'} ({dtype})")
    context = torch.randn(1, text_tokens, 4096, generator=torch.Generator().manual_seed(0))
    positive = [[context, {"pooled_output": None}]]
    latent = {"samples": torch.zeros(latent_shape)}

    clock = time.perf_counter if cuda else time.process_time  # on a shared CPU, the process's own CPU time

    def run(m):
        t = clock()
        host.nodes.common_ksampler(m, SEED, steps, 1.0, "euler", "simple", positive, positive, latent)
        return (clock() - t) / steps

    variants = [("uncached", model)] + [(p, host.cache.apply_cache(model, core_cache.CacheConfig(policy=p, threshold=0.0)))
                                        for p in core_cache.POLICIES]
    run(model)  # warm-up: weights to the device, kernels chosen
    times = {name: [] for name, _ in variants}
    for _ in range(args.repeats):
        for name, m in variants:  # interleaved
            times[name].append(run(m))
    base = statistics.median(times["uncached"])
    print(f"{steps} steps, cfg 1, latent {list(latent_shape)}; median of {args.repeats} runs, interleaved; "
          f"{'wall' if cuda else 'process CPU'} time")
    print(f"{'variant':<10} {'s/step':>9} {'overhead':>9}")
    for name, _ in variants:
        t = statistics.median(times[name])
        print(f"{name:<10} {t:>9.4f} {100 * (t / base - 1):>8.2f}%")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/root/ComfyUI"))
    parser.add_argument("--digits", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "cache_curve.png"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 makes the process CPU time a clean measure of work on a shared machine")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--small", action="store_true", help="--overhead on a CPU-sized Wan (2 blocks, dim 256)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.overhead:  # all threads: the device's step time is what is measured
        return overhead(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, {args.digits} digits, euler {STEPS} steps, cfg {CFG:g}, seed {SEED}")
    rows = compare(args)
    print_table(rows)
    plot(rows, args.out)
    clip = chunk_clip_benchmark()
    print(f"chunk cache, synthetic mostly-static clip: {clip}")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"rows": rows, "clip": clip}, f, indent=1, default=str)
    print(f"curve: {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
