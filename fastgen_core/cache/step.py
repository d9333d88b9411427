"""The step policy: reuse the whole model output (EasyCache / TeaCache / MagCache family).

Whether a step can be skipped comes from an error model: with a calibration profile, the per-step
relative output changes measured once for this model and schedule (summed since the last computed
step); without one, the online estimate `k * |x - x_ref| / |out_ref|` where k, the ratio of output
to input change, is re-measured on every computed step. A skipped step's output is the last one
extrapolated linearly in sigma (first-order, from the last two computed outputs), which tracks the
slow drift of the velocity far better than plain reuse.
"""

from __future__ import annotations

import math

import torch

from .base import CacheConfig, CacheState, CacheStats, Mode, Reuse, per_sample_change
from .profile import ChangeProfile


class ErrorModel:
    """Estimated relative error of reusing a stream's cached output at this step.

    With extrapolation (the default) the error of a skip is the error of the linear prediction,
    which grows with the square of the gap: estimate = rate * g(g+1)/2 for a gap of g steps since
    the last compute. The rate is measured, not guessed: at every computed step the prediction the
    cache would have made is compared with the real output (per conditioning slice, worst one
    counts). A calibration profile gives it per step instead (its `curvature`: the one-step
    extrapolation error measured in the calibration run), summed as sum_k curvature[k] * (k - last).

    With plain reuse the error is the output's first-order change: from the profile, the
    calibrated per-step changes summed since the last compute; online, k * |x - x_ref| / |out_ref|
    with k = |out - out_prev| / |x - x_prev| re-measured at every computed step (EasyCache's model).
    """

    def __init__(self, profile: ChangeProfile | None, extrapolate: bool = False):
        self.profile = profile
        self.extrapolate = extrapolate
        self.last_step: int | None = None
        self.x_ref = self.out_ref = None
        self.k: float | None = None
        self.rate: float | None = None

    def estimate(self, step: int, x: torch.Tensor, groups: int) -> float:
        if self.last_step is None:
            return math.inf
        if self.extrapolate:
            return self._extrapolation_error(step)
        if self.profile is not None:
            return float(sum(self.profile.change[self.last_step + 1 : step + 1]))
        if self.k is None or self.x_ref.shape != x.shape:
            return math.inf
        input_change = per_sample_change(x, self.x_ref, groups) * _mean_abs(self.x_ref) / max(_mean_abs(self.out_ref), 1e-12)
        return self.k * input_change

    def _extrapolation_error(self, step: int) -> float:
        if self.profile is not None and self.profile.curvature is not None:
            return float(sum(self.profile.curvature[k] * (k - self.last_step) for k in range(self.last_step + 1, step + 1)))
        if self.rate is None:
            return math.inf
        gap = step - self.last_step
        return self.rate * gap * (gap + 1) / 2

    def computed(self, step: int, x: torch.Tensor, out: torch.Tensor, groups: int, predicted: torch.Tensor | None = None):
        if self.x_ref is not None and self.x_ref.shape == x.shape:
            dx = per_sample_change(x, self.x_ref, groups) * _mean_abs(self.x_ref)
            dout = per_sample_change(out, self.out_ref, groups) * _mean_abs(self.out_ref)
            self.k = dout / dx if dx > 0 else None
        if predicted is not None and self.last_step is not None:
            gap = step - self.last_step
            self.rate = per_sample_change(predicted, out, groups) / (gap * (gap + 1) / 2)
        self.last_step = step
        self.x_ref, self.out_ref = x.detach().clone(), out.detach().clone()


def _mean_abs(t: torch.Tensor) -> float:
    return float(t.float().abs().mean())


class StepCacheState(CacheState):
    """One stream's step cache, probed with the model input. `run(x, sigma, step, steps, compute)`
    returns the output, computing it with `compute()` or predicting it from the cache."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        super().__init__(config, profile, stats, groups)
        self.error = ErrorModel(profile, config.extrapolate)
        self.reuse = Reuse(config.extrapolate)

    def _choose(self, x: torch.Tensor, step: int) -> Mode:
        if self.consecutive >= self.config.max_skips or not self.reuse.ready(x):
            return Mode.COMPUTE
        return self._skip_if_below(self.error.estimate(step, x, self.groups))

    def run(self, x: torch.Tensor, sigma: float, step: int, steps: int, compute) -> torch.Tensor:
        if self.decide(x, step, steps) is Mode.SKIP:
            self.consecutive += 1
            self.stats.steps_skipped += 1
            return self.reuse.predict(sigma).to(x.dtype)
        out = compute()
        self.consecutive = 0
        # what a skip would have predicted here: measures the extrapolation error as it goes
        predicted = self.reuse.predict(sigma) if self.reuse.can_extrapolate(out) else None
        self.error.computed(step, x, out, self.groups, predicted)
        self.reuse.store(sigma, out)
        return out
