"""The main job on the embedded default: generate a digit grid, print timings and quality, write a PNG.

    python -m fastgen_core.demo                      # teacher, 32 Euler steps, cfg 3
    python -m fastgen_core.demo --out out/digits.png --quality-samples 500

Quality: conditional accuracy (the shipped classifier reads each digit) and the FID-like score on
its features, printed beside the floor that real held-out digits reach with the same count.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from . import checkpoint, images, networks
from . import eval as metrics
from .data import from_model_space
from .train import TEACHER_PATH


def run(model_path: str, out: str, steps: int | None, cfg: float | None, seed: int, quality_samples: int, rows: int = 8):
    t0 = time.perf_counter()
    net, recipe = checkpoint.load_network(model_path)
    classifier = metrics.load_classifier()
    load_s = time.perf_counter() - t0
    steps = steps or (recipe.steps if recipe else 32)
    cfg = cfg if cfg is not None else (recipe.cfg if recipe else 3.0)

    labels = torch.arange(rows * 10) % 10  # each row draws 0..9
    t0 = time.perf_counter()
    grid_samples = networks.sample_digits(net, labels, steps=steps, guidance=cfg, seed=seed)
    grid_s = time.perf_counter() - t0
    grid = images.make_grid(from_model_space(grid_samples), rows=rows)
    images.write_png(out, grid, scale=4)

    quality_labels = torch.arange(quality_samples) % 10
    t0 = time.perf_counter()
    samples = networks.sample_digits(net, quality_labels, steps=steps, guidance=cfg, seed=seed + 1)
    quality_s = time.perf_counter() - t0
    accuracy = metrics.conditional_accuracy(classifier, samples, quality_labels)
    fid = metrics.fid_vs_train(classifier, from_model_space(samples))
    floor = metrics.fid_floor(classifier, min(quality_samples, 500))

    evals = 2 if cfg != 1.0 else 1
    rows_out = [
        ("model", os.path.basename(model_path)),
        ("sampler", f"{recipe.sampler if recipe else 'euler'}, {steps} steps, cfg {cfg:g} ({steps * evals} network evals per image)"),
        ("device", f"cpu, {torch.get_num_threads()} threads"),
        ("load", f"{load_s:.2f} s"),
        (f"grid of {len(labels)}", f"{grid_s:.2f} s ({1000 * grid_s / len(labels):.1f} ms per image)"),
        (f"quality batch of {quality_samples}", f"{quality_s:.2f} s ({1000 * quality_s / quality_samples:.1f} ms per image)"),
        ("conditional accuracy", f"{100 * accuracy:.1f} %"),
        ("FID-like vs train", f"{fid:.2f}  (floor: real held-out digits, same count: {floor:.2f})"),
        ("grid PNG", out),
    ]
    width = max(len(k) for k, _ in rows_out)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows_out))
    return {"accuracy": accuracy, "fid": fid, "floor": floor, "grid_s": grid_s, "quality_s": quality_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TEACHER_PATH, help="a FastGen DigitDiT file (default: the shipped teacher)")
    parser.add_argument("--out", default=os.path.join("out", "digits.png"))
    parser.add_argument("--steps", type=int, default=None, help="default: the model's recipe")
    parser.add_argument("--cfg", type=float, default=None, help="default: the model's recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality-samples", type=int, default=200)
    args = parser.parse_args(argv)
    run(args.model, args.out, args.steps, args.cfg, args.seed, args.quality_samples)


if __name__ == "__main__":
    main()
