"""Where the GPU waits: a profiler trace of one prompt, its GPU idle time, and what the CPU was
doing during each idle gap (the named host / pack function and the torch op running then).

    with annotated(TARGETS), torch.profiler.profile(activities=[CPU, CUDA]) as prof:
        run_the_prompt()
    prof.export_chrome_trace(path)
    print("\n".join(gap_report(path)))

`annotated` wraps the named functions in `torch.profiler.record_function` ranges for the duration
(cheap, unlike with_stack's Python tracer, which would change the timings it explains).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import importlib
import json
import sys
from collections import defaultdict

import torch

# (module, attribute path): the host's sampling path, the Wan forward, and the pack's causal loop
TARGETS = [
    ("comfy.samplers", "CFGGuider.sample"), ("comfy.samplers", "CFGGuider.inner_sample"),
    ("comfy.samplers", "process_conds"), ("comfy.samplers", "calc_cond_batch"), ("comfy.samplers", "KSAMPLER.sample"),
    ("comfy.sampler_helpers", "prepare_sampling"), ("comfy.model_management", "load_models_gpu"),
    ("comfy.model_base", "BaseModel.apply_model"), ("comfy.ldm.wan.model", "WanModel.forward_orig"),
    ("comfy.ldm.wan.model", "WanModel.rope_encode"), ("comfy.utils", "ProgressBar.update_absolute"),
    ("comfy.sample", "prepare_noise"),
    ("*.nodes.host.causal_loop", "context_pass"), ("*.nodes.host.causal_loop", "decode_beside"),
    ("*.nodes.host.wan_causal", "WanCausalRun.begin_chunk"),
    ("*.nodes.host.tiny_decoder", "frames_as_images"), ("*.fastgen_core.graphs", "ForwardGraphs.__call__"),
    ("*.fastgen_core.sampling", "sample_tcd"), ("*.fastgen_core.sampling", "_noise_like"),
]


def module_named(name: str):
    """A module by name; "*.x.y": the loaded module whose name ends in ".x.y" (the pack's, under its folder name)."""
    if not name.startswith("*"):
        return importlib.import_module(name)
    return next((m for key, m in list(sys.modules.items()) if key.endswith(name[1:]) and m is not None), None)


def _labelled(fn, label):
    if getattr(fn, "_gap_label", None):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    wrapper._gap_label = label
    return wrapper


@contextlib.contextmanager
def annotated(targets=TARGETS):
    """The named functions wrapped in record_function ranges while the block runs (not generator
    functions: their call returns at once)."""
    undo = []
    try:
        for module_name, path in targets:
            owner = module_named(module_name)
            *parents, attr = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None) if owner is not None else None
            fn = getattr(owner, attr, None) if owner is not None else None
            if fn is None:
                print(f"gpu_gaps: {module_name}.{path} not found, not annotated", flush=True)
                continue
            setattr(owner, attr, _labelled(fn, f"{module_name.lstrip('*.')}.{path}"))
            undo.append((owner, attr, fn))
        yield
    finally:
        for owner, attr, fn in reversed(undo):
            setattr(owner, attr, fn)


GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def _merged(intervals):
    out = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def _innermost(events, starts, t, category):
    """The innermost event of `category` on the thread that contains time t (events nest)."""
    i = bisect.bisect_right(starts, t) - 1
    best = None
    for j in range(i, max(-1, i - 5000), -1):
        ts, end, cat, name = events[j]
        if cat == category and ts <= t < end and (best is None or ts > best[0]):
            best = (ts, name)
            break
    return best[1] if best else "-"


def gap_report(trace_path: str, min_gap_ms: float = 0.05, top: int = 14) -> list[str]:
    """GPU busy / idle over the window from the first GPU activity to the last, and the idle time
    grouped by (innermost annotated function, innermost torch op / CUDA call) on the CPU thread that
    ran the prompt at the middle of each gap."""
    with open(trace_path) as f:
        trace = json.load(f)
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = _merged((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES)
    if not gpu:
        return ["gpu_gaps: no GPU activity in the trace"]
    by_thread = defaultdict(list)
    for e in events:
        if e.get("cat") in ("user_annotation", "cpu_op", "cuda_runtime", "cuda_driver"):
            by_thread[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["cat"], e["name"]))
    # the thread that ran the prompt: the one holding the annotated ranges
    tid = max(by_thread, key=lambda t: sum(1 for ev in by_thread[t] if ev[2] == "user_annotation"))
    cpu = sorted(by_thread[tid])
    starts = [ev[0] for ev in cpu]
    window = gpu[-1][1] - gpu[0][0]
    busy = sum(end - start for start, end in gpu)
    groups = defaultdict(lambda: [0.0, 0])
    for (_, end), (start, _) in zip(gpu, gpu[1:], strict=False):
        gap = start - end
        if gap < min_gap_ms * 1000:
            continue
        middle = (start + end) / 2
        where = _innermost(cpu, starts, middle, "user_annotation")
        op = _innermost(cpu, starts, middle, "cuda_runtime")
        if op == "-":
            op = _innermost(cpu, starts, middle, "cpu_op")
        groups[(where, op)][0] += gap / 1000
        groups[(where, op)][1] += 1
    syncs = defaultdict(lambda: [0.0, 0])
    for ts, end, cat, name in cpu:
        if cat == "cuda_runtime" and ("Synchronize" in name or name.startswith("cudaMemcpy")):
            syncs[name][0] += (end - ts) / 1000
            syncs[name][1] += 1
    idle = window - busy
    lines = [f"GPU window {window / 1000:.1f} ms, busy {busy / 1000:.1f} ms, idle {idle / 1000:.1f} ms "
             f"({100 * idle / window:.1f} %); idle gaps >= {min_gap_ms} ms by what the CPU ran at their middle:"]
    for (where, op), (ms, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:8.2f} ms in {count:4d} gaps  {where}  /  {op}")
    lines.append("CPU calls that wait or copy: " + "; ".join(
        f"{name} x{count} {ms:.1f} ms" for name, (ms, count) in sorted(syncs.items(), key=lambda kv: -kv[1][0])))
    return lines
