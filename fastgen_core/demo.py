"""The main job on the embedded default: the teacher at 32 steps against its distilled students at 4
and 1 step, on the same digits and noise. Prints time and quality per model, writes one grid PNG.

    python -m fastgen_core.demo                          # every shipped model, 200 quality samples
    python -m fastgen_core.demo --models digit_teacher.safetensors --quality-samples 500

Each model is sampled by its own recipe (fastgen.recipe in the file): the teacher with Euler and
cfg 3 (two network evaluations per step), the DMD students with their timesteps and cfg 1.
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

SHIPPED = ("digit_teacher.safetensors", "digit_student_4step.safetensors", "digit_student_1step.safetensors")


def evaluate(path: str, classifier, grid_labels, quality_labels, seed: int) -> dict:
    net, recipe = checkpoint.load_network(path)
    if recipe is None:
        raise ValueError(f"{path} carries no fastgen.recipe: the demo samples every model by its recipe")
    t0 = time.perf_counter()
    grid = networks.sample_with_recipe(net, grid_labels, recipe, seed=seed)
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = networks.sample_with_recipe(net, quality_labels, recipe, seed=seed + 1)
    quality_s = time.perf_counter() - t0
    evals = recipe.steps * (2 if recipe.cfg != 1.0 else 1)
    return {
        "model": os.path.basename(path), "recipe": f"{recipe.sampler}, {recipe.steps} steps, cfg {recipe.cfg:g}", "evals": evals,
        "ms": 1000 * quality_s / len(quality_labels), "grid": grid, "grid_s": grid_s,
        "accuracy": metrics.conditional_accuracy(classifier, samples, quality_labels),
        "fid": metrics.fid_vs_train(classifier, from_model_space(samples)),
    }


def run(paths, out: str, seed: int = 0, quality_samples: int = 200, rows_per_model: int = 2) -> list[dict]:
    classifier = metrics.load_classifier()
    grid_labels = torch.arange(rows_per_model * 10) % 10
    quality_labels = torch.arange(quality_samples) % 10
    results = [evaluate(p, classifier, grid_labels, quality_labels, seed) for p in paths]
    floor = metrics.fid_floor(classifier, min(quality_samples, 500))

    grid = torch.cat([r["grid"] for r in results])
    images.write_png(out, images.make_grid(from_model_space(grid), rows=rows_per_model * len(results)), scale=4)
    print(f"cpu, {torch.get_num_threads()} threads; {quality_samples} digits per model (same noise); "
          f"FID-like floor (real held-out digits, same count): {floor:.2f}")
    header = f"{'model':<34} {'recipe':<32} {'evals/img':>9} {'ms/img':>7} {'accuracy':>9} {'FID-like':>9}"
    print(header)
    for r in results:
        print(f"{r['model']:<34} {r['recipe']:<32} {r['evals']:>9} {r['ms']:>7.1f} {100 * r['accuracy']:>8.1f}% {r['fid']:>9.2f}")
    print(f"grid PNG: {out} ({rows_per_model} rows of 0-9 per model, top to bottom in this order)")
    for r in results:
        r.pop("grid")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help="FastGen DigitDiT files, or names in fastgen_core/assets (default: every shipped model)")
    parser.add_argument("--out", default=os.path.join("out", "digits.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality-samples", type=int, default=200)
    args = parser.parse_args(argv)
    names = args.models or [n for n in SHIPPED if os.path.isfile(os.path.join(metrics.ASSETS, n))]
    paths = [n if os.path.isfile(n) else os.path.join(metrics.ASSETS, n) for n in names]
    run(paths, args.out, args.seed, args.quality_samples)


if __name__ == "__main__":
    main()
