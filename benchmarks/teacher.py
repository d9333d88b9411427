"""The embedded image teacher on this machine: speed and quality, measured in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/teacher.py [--model PATH] [--samples 1000]

Prints: the CPU time of the demo (python -m fastgen_core.demo, default settings) and of one
32-step, 64-digit batch (median of 3); conditional accuracy on `--samples` digits (100 per class,
32 Euler steps, the recipe's cfg) read by the shipped classifier; the FID-like score of 500
generated digits against the training set beside the floor (500 real held-out digits).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen_core import checkpoint  # noqa: E402
from fastgen_core import eval as metrics
from fastgen_core.data import from_model_space  # noqa: E402
from fastgen_core.networks import sample_digits  # noqa: E402
from fastgen_core.train import TEACHER_PATH  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=TEACHER_PATH)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()

    net, recipe = checkpoint.load_network(args.model)
    classifier = metrics.load_classifier()
    rows = [("model", os.path.relpath(args.model)), ("recipe", f"{recipe.sampler}, {recipe.steps} steps, cfg {recipe.cfg:g}"),
            ("threads", str(torch.get_num_threads()))]

    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "fastgen_core.demo", "--model", args.model, "--out", os.path.join(tmp, "g.png")],
                           check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            rows.append(("demo command (wall)", f"{time.perf_counter() - t0:.1f} s"))

    times = []
    for seed in range(3):
        t0 = time.perf_counter()
        sample_digits(net, torch.arange(64) % 10, steps=32, guidance=recipe.cfg, seed=seed)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    rows.append(("64 digits, 32 steps", f"{median:.2f} s (median of 3; {1000 * median / 64:.1f} ms/digit)"))

    labels = torch.arange(args.samples) % 10
    t0 = time.perf_counter()
    samples = sample_digits(net, labels, steps=recipe.steps, guidance=recipe.cfg, seed=1000)
    rows.append((f"{args.samples} digits", f"{time.perf_counter() - t0:.1f} s"))
    accuracy = metrics.conditional_accuracy(classifier, samples, labels)
    per_class = [(metrics.predict(classifier, from_model_space(samples[labels == d])) == d).float().mean().item() for d in range(10)]
    worst = min(range(10), key=per_class.__getitem__)
    rows.append(("conditional accuracy", f"{100 * accuracy:.1f} % (worst digit {worst}: {100 * per_class[worst]:.0f} %)"))
    fid = metrics.fid_vs_train(classifier, from_model_space(samples[:500]))
    rows.append(("FID-like, 500 vs train", f"{fid:.2f} (floor, 500 real held-out: {metrics.fid_floor(classifier, 500):.2f})"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
