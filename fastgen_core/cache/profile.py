"""Calibration: one uncached run measures how much a model's output changes per step on a schedule;
the cache then decides from that profile (deterministic, and allowed on few-step schedules)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .base import FEW_STEPS, Reuse, per_sample_change

PROFILE_TOLERANCE = 1e-3  # sigmas of a profile match a schedule within this


@dataclass
class ChangeProfile:
    """Per-step relative output change of one model on one schedule, measured by a calibration
    pass: change[i] = |out_i - out_{i-1}| / |out_{i-1}| (change[0] = inf: nothing before it)."""

    sigmas: list[float]
    change: list[float]
    curvature: list[float] | None = None  # relative error of the linear extrapolation from the two steps before

    def matches(self, sample_sigmas) -> bool:
        sigmas = [float(s) for s in sample_sigmas]
        return len(sigmas) == len(self.sigmas) and all(abs(a - b) <= PROFILE_TOLERANCE for a, b in zip(sigmas, self.sigmas, strict=True))

    def to_json(self) -> str:
        def finite(values):
            return None if values is None else [c if math.isfinite(c) else None for c in values]

        return json.dumps({"sigmas": self.sigmas, "change": finite(self.change), "curvature": finite(self.curvature)})

    @classmethod
    def from_json(cls, text: str) -> ChangeProfile:
        data = json.loads(text)

        def floats(values):
            return None if values is None else [math.inf if c is None else float(c) for c in values]

        return cls([float(s) for s in data["sigmas"]], floats(data["change"]), floats(data.get("curvature")))

    def summary(self) -> str:
        shown = ", ".join("-" if not math.isfinite(c) else f"{c:.3f}" for c in self.change)
        return f"{len(self.change)} steps, relative output change per step: {shown}"


class ProfileRecorder:
    """Records the per-step output change (and linear-extrapolation error) of every stream during
    one uncached run; the profile keeps, per step, the largest value over the streams (cond and
    uncond may differ)."""

    def __init__(self):
        self.history: dict = {}
        self.change: dict[int, float] = {}
        self.curvature: dict[int, float] = {}

    def record(self, key, step: int, groups: int, output: torch.Tensor, sigma: float | None = None):
        history = [h for h in self.history.get(key, []) if h[1].shape == output.shape]
        change = math.inf if not history else per_sample_change(output, history[-1][1], groups)
        curvature = math.inf
        if len(history) == 2 and sigma is not None:
            curvature = per_sample_change(Reuse(extrapolate=True, points=history).predict(sigma), output, groups)
        self.change[step] = max(self.change.get(step, 0.0), change)
        self.curvature[step] = max(self.curvature.get(step, 0.0), curvature)
        self.history[key] = (history + [(float(sigma) if sigma is not None else 0.0, output.detach().clone())])[-2:]

    def profile(self, sample_sigmas) -> ChangeProfile:
        sigmas = [float(s) for s in sample_sigmas]
        steps = len(sigmas) - 1
        missing = [i for i in range(steps) if i not in self.change]
        if missing:
            raise ValueError(f"calibration saw no model call at steps {missing}: the sampler skipped them")
        return ChangeProfile(sigmas, [self.change[i] for i in range(steps)], [self.curvature[i] for i in range(steps)])


def caching_allowed(steps: int, profile: ChangeProfile | None) -> tuple[bool, str]:
    """Few-step awareness: (allowed, why)."""
    if steps > FEW_STEPS or profile is not None:
        return True, ""
    return False, (f"{steps} steps: few-step schedules change too much per step to reuse blindly, so caching is off; "
                   "run Calibrate Cache on this model and schedule to let it use a measured profile")
