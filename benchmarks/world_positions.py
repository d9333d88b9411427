"""Why the world model follows the keys: frame-only rotary positions against camera-relative ones,
and the size of a move, at one small training budget each, side by side in one run.

    python benchmarks/world_positions.py            # 4 rows, ~2 min each on 2 CPU threads

Each row trains the causal world DiT from scratch (dim 64, depth 2; 1,000 steps of 8 clips of 8
frames from 64 game episodes; lr 2e-3) with the game's move set to the row's pixels per frame,
then scores it with `train.world_probe` (x0 guesses under each move key on 6 held-out worlds: the
share of frames whose shift is the one the key makes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen_core import data, networks, train  # noqa: E402

ROWS = [("frame only", 8), ("camera-relative", 2), ("camera-relative", 4), ("camera-relative", 8)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    speed = data.GAME_SPEED
    print(f"{'positions':<16} {'move':>5} {'probe':>40} {'time':>6}")
    try:
        for positions, pixels in ROWS:
            data.GAME_SPEED = pixels  # the game and the probe read it at call time
            config = networks.CausalWorldDiTConfig(
                dim=64, depth=2, heads=2, camera_motion=data.camera_motion() if positions == "camera-relative" else None)
            start = time.perf_counter()
            net = train.train_world(None, steps=args.steps, batch=8, config=config, clip_frames=8, episodes=64, warmup=50,
                                    lr=2e-3, log=lambda *_: None)
            print(f"{positions:<16} {pixels:>3}px {train.world_probe(net):>40} {time.perf_counter() - start:>5.0f}s",
                  flush=True)
    finally:
        data.GAME_SPEED = speed


if __name__ == "__main__":
    main()
