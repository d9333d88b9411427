"""Teacher samplers side by side on the embedded teacher: Euler vs DPM-Solver++(2M) vs AB2 at the same
number of steps (each step one guided network evaluation), same seeds.

    PYTHONPATH=. .venv/bin/python benchmarks/samplers.py [--samples 500] [--steps 4 8 16 32]

Prints, per sampler and step count: conditional accuracy (shipped classifier), the FID-like score
against the training digits (floor: real held-out digits of the same count), and PSNR against a
64-step DPM++(2M) reference from the same noise (how close to the converged ODE solution).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen_core import checkpoint  # noqa: E402
from fastgen_core import eval as metrics  # noqa: E402
from fastgen_core.data import from_model_space  # noqa: E402
from fastgen_core.networks import sample_digits  # noqa: E402
from fastgen_core.train import TEACHER_PATH  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    args = parser.parse_args()
    net, recipe = checkpoint.load_network(TEACHER_PATH)
    classifier = metrics.load_classifier()
    labels = torch.arange(args.samples) % 10
    floor = metrics.fid_floor(classifier, min(args.samples, 500))
    reference = sample_digits(net, labels, steps=64, guidance=recipe.cfg, seed=0, sampler="dpmpp_2m")
    print(f"{args.samples} digits per cell, cfg {recipe.cfg:g}, threads {torch.get_num_threads()}; "
          f"FID-like floor {floor:.2f}; reference: 64-step dpmpp_2m")
    print(f"{'sampler':<10} {'steps':>5} {'accuracy':>9} {'FID-like':>9} {'PSNR vs ref':>12} {'seconds':>8}")
    for steps in args.steps:
        for sampler in ("euler", "dpmpp_2m", "ab2"):
            t0 = time.perf_counter()
            samples = sample_digits(net, labels, steps=steps, guidance=recipe.cfg, seed=0, sampler=sampler)
            seconds = time.perf_counter() - t0
            accuracy = metrics.conditional_accuracy(classifier, samples, labels)
            fid = metrics.fid_vs_train(classifier, from_model_space(samples[:500]))
            psnr = metrics.psnr(samples, reference)
            print(f"{sampler:<10} {steps:>5} {100 * accuracy:>8.1f}% {fid:>9.2f} {psnr:>10.2f}dB {seconds:>8.1f}")


if __name__ == "__main__":
    main()
