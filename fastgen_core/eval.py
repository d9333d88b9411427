"""Quality metrics for the embedded models, all offline.

- `DigitClassifier`: a small CNN the project trains on the MNIST train split and ships
  (assets/digit_classifier.safetensors). It gives
  (a) conditional accuracy: the fraction of generated digits classified as the requested class;
  (b) a FID-like score: the Frechet distance between Gaussian fits of its penultimate features.
  The held-out-vs-train score is the floor: what real digits score against real digits.
- PSNR / SSIM through kornia.metrics for comparisons at equal seeds.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import from_model_space

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLASSIFIER_PATH = os.path.join(ASSETS, "digit_classifier.safetensors")


@dataclass(frozen=True)
class DigitClassifierConfig:
    width: int = 32
    features: int = 128

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DigitClassifierConfig:
        return cls(**values)


class DigitClassifier(nn.Module):
    """Three conv stages and global pooling: [N, 1, 28, 28] in 0..1 -> logits over 10 digits."""

    def __init__(self, config: DigitClassifierConfig = DigitClassifierConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, config.features, 3, padding=1), nn.GroupNorm(8, config.features), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(config.features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body((images - 0.13) / 0.31)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(steps: int = 1500, batch: int = 128, seed: int = 0, log=print) -> DigitClassifier:
    """Train on the train split with kornia's random affine augmentation (small shifts, rotations,
    scales), so generated digits that are slightly off-centre are still recognised."""
    import kornia.augmentation as K

    from .data import load_mnist

    torch.manual_seed(seed)
    train = load_mnist("train")
    net = DigitClassifier()
    augment = K.RandomAffine(degrees=12, translate=(0.1, 0.1), scale=(0.85, 1.15), p=0.9)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(train.labels), (batch,), generator=gen)
        loss = F.cross_entropy(net(augment(train.images[idx])), train.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"classifier step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s")
    return net.eval().requires_grad_(False)


def load_classifier(path: str = CLASSIFIER_PATH) -> DigitClassifier:
    from .checkpoint import load_network

    net, _ = load_network(path)
    if not isinstance(net, DigitClassifier):
        raise ValueError(f"{path} holds a {type(net).__name__}, not a DigitClassifier")
    return net


@torch.no_grad()
def _batched(fn, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


@torch.no_grad()
def predict(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """Predicted digits for [N, 1, 28, 28] images in 0..1."""
    return _batched(classifier, images.float()).argmax(dim=1)


def conditional_accuracy(classifier: DigitClassifier, samples_model_space: torch.Tensor, labels) -> float:
    """Fraction of generated samples ([N, 3, 32, 32] in -1..1) classified as their requested digit."""
    predicted = predict(classifier, from_model_space(samples_model_space))
    return (predicted == torch.as_tensor(labels).reshape(-1)).float().mean().item()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2), in float64 with symmetric
    eigendecompositions (no scipy needed)."""
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m):
        vals, vecs = torch.linalg.eigh(m)
        return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T

    root_a = sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def fid_like(classifier: DigitClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """FID-like score between two sets of [N, 1, 28, 28] images in 0..1 (lower is closer)."""
    return frechet_distance(_batched(classifier.features, images_a.float()), _batched(classifier.features, images_b.float()))


def fid_vs_train(classifier: DigitClassifier, images: torch.Tensor) -> float:
    """FID-like score of [N, 1, 28, 28] images against the 4500 training digits."""
    from .data import load_mnist

    return fid_like(classifier, images, load_mnist("train").images)


def fid_floor(classifier: DigitClassifier, count: int = 500) -> float:
    """The score of `count` real held-out digits against the training digits: the best a generator
    can expect with that many samples (the score is biased upward for small counts, so compare
    generated and real sets of the same size)."""
    from .data import load_mnist

    held = load_mnist("heldout")
    if not 2 <= count <= len(held.labels):
        raise ValueError(f"count must be 2..{len(held.labels)}, got {count}")
    # Take the same number of each digit so the floor has the generated sets' class balance.
    order = torch.argsort(torch.arange(len(held.labels)) % 50 * 10 + held.labels, stable=True)
    return fid_vs_train(classifier, held.images[order[:count]])


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 2.0) -> float:
    """PSNR between two image batches in model space (-1..1, so the range is 2)."""
    import kornia.metrics

    return kornia.metrics.psnr(a.float(), b.float(), max_val).item()


def estimate_shift(before: torch.Tensor, after: torch.Tensor, ignore_centre: int = 10, max_shift: int = 12) -> tuple[int, int]:
    """The whole-pixel translation (dx, dy), |dx|, |dy| <= `max_shift`, that best maps frame
    `before` onto `after` ([C, H, W]): after(x, y) ~ before(x - dx, y - dy), by the least mean
    squared difference over the frames' overlap.

    Used on game frames, where the camera follows the agent: moving right shifts the view by
    (-GAME_SPEED, 0). A square of `ignore_centre` pixels around the centre (the agent, which stays
    put) is left out of the comparison so it does not vote for (0, 0). (An exhaustive search, not
    phase correlation: whitened phase correlation misread 3 of 67 true 8-px moves.)"""
    before, after = before.float(), after.float()
    _, h, w = after.shape
    keep = torch.ones(h, w)
    if ignore_centre:
        keep[h // 2 - ignore_centre:h // 2 + ignore_centre, w // 2 - ignore_centre:w // 2 + ignore_centre] = 0
    best, best_shift = float("inf"), (0, 0)
    # smallest moves first, so a tie (a flat frame) reads as the smaller move
    for dx, dy in sorted(((dx, dy) for dx in range(-max_shift, max_shift + 1) for dy in range(-max_shift, max_shift + 1)),
                         key=lambda s: (abs(s[0]) + abs(s[1]), s)):
        # after[y, x] against before[y - dy, x - dx] where both exist
        ya, yb = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
        xa, xb = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
        weight = keep[ya, xa] * keep[yb, xb]
        error = (((after[:, ya, xa] - before[:, yb, xb]) ** 2).mean(0) * weight).sum() / weight.sum().clamp_min(1)
        if error < best - 1e-9:
            best, best_shift = float(error), (dx, dy)
    return best_shift
