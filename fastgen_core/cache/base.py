"""What every cache policy shares: the settings, the step window, the relative change that decides a
skip, the store of computed values a skip reuses, the base of the per-stream states, statistics."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .profile import ChangeProfile

POLICIES = {
    "step": "skip whole model calls (output extrapolated from the last computed ones)",
    "block": "always run the first block; skip the rest when its residual barely moved (First Block Cache; "
             "DeepCache-like on SD-family UNets)",
    "chunk": "run the remaining blocks only on the spatial/temporal chunks whose first-block residual moved",
}
FEW_STEPS = 8  # at or below this many steps, caching needs a calibration profile


@dataclass(frozen=True)
class CacheConfig:
    policy: str = "step"
    threshold: float = 0.1
    start: float = 0.0
    end: float = 1.0
    max_skips: int = 4
    chunk_tokens: int = 2  # chunk side, in tokens (patches), for the chunk policy
    chunk_frames: int = 1  # chunk depth, in latent frames (video), for the chunk policy
    chunk_context: int = 1  # chunk policy: neighbouring chunks (this many around) run too, as context
    extrapolate: bool = True  # step / block: first-order extrapolation in sigma instead of plain reuse

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        if self.threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"cache window needs 0 <= start <= end <= 1, got start {self.start}, end {self.end}")
        if self.max_skips < 1 or self.chunk_tokens < 1 or self.chunk_frames < 1 or self.chunk_context < 0:
            raise ValueError("max_skips, chunk_tokens and chunk_frames must be >= 1")


class Mode(enum.Enum):
    """What a stream's cache does with the rest of one model call."""

    COMPUTE = "compute"  # run everything and refresh the cache
    SKIP = "skip"  # reuse the cache for everything after the probe
    PARTIAL = "partial"  # chunk policy: run the changed chunks only, reuse the others


# ----------------------------------------------------------------------------- steps and change


def step_index(sigma: float, sample_sigmas) -> tuple[int, int]:
    """(index of the step whose sigma is nearest, number of steps) in a sampler's sigma list
    (which ends at the final sigma, usually 0)."""
    sigmas = [float(s) for s in sample_sigmas]
    steps = len(sigmas) - 1
    if steps < 1:
        return 0, 1
    index = min(range(steps), key=lambda i: abs(sigmas[i] - float(sigma)))
    return index, steps


def in_window(step: int, steps: int, config: CacheConfig) -> bool:
    """May this step be skipped at all? Never the first or the last (the first sets the cache, the
    last decides the fine detail), and only within [start, end) of the steps."""
    if step <= 0 or step >= steps - 1:
        return False
    fraction = step / steps
    return config.start <= fraction < config.end


def relative_change(new: torch.Tensor, ref: torch.Tensor, dims=None, chunks: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """mean |new - ref| / mean |ref| over `dims` (all by default); 0/0 counts as no change, x/0 as
    infinite. `chunks` = (chunk id of every index of dim 1, number of chunks): the means are summed
    per chunk first, giving one change per chunk ([B, chunks] after `dims=-1` on [B, L, C])."""
    dims = tuple(range(new.ndim)) if dims is None else dims
    num = (new.float() - ref.float()).abs().mean(dim=dims)
    den = ref.float().abs().mean(dim=dims)
    if chunks is not None:
        ids, count = chunks
        num = num.new_zeros(num.shape[0], count).index_add_(1, ids, num)
        den = den.new_zeros(den.shape[0], count).index_add_(1, ids, den)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.where(num > 0, torch.full_like(num, math.inf), num))


def per_sample_change(new: torch.Tensor, ref: torch.Tensor, groups: int) -> float:
    """The largest relative change over `groups` equal batch slices (cond / uncond chunks): a call
    is only as skippable as its most-changed conditioning."""
    changes = [relative_change(n, r) for n, r in zip(new.chunk(groups), ref.chunk(groups), strict=True)]
    return float(max(changes))


# ----------------------------------------------------------------------------- reuse and state


class Reuse:
    """The last two computed values of one quantity with their sigmas; predicts it at a new sigma
    by linear extrapolation (or plain reuse with one value, or when asked to)."""

    def __init__(self, extrapolate: bool, points: list[tuple[float, torch.Tensor]] | None = None):
        self.extrapolate = extrapolate
        self.points: list[tuple[float, torch.Tensor]] = list(points or [])

    def store(self, sigma: float, value: torch.Tensor):
        self.points = (self.points + [(float(sigma), value.detach().clone())])[-2:]

    def restart(self, sigma: float, value: torch.Tensor):
        """Keep this value alone: predictions reuse it as it is until the next store."""
        self.points = [(float(sigma), value.detach().clone())]

    def ready(self, like: torch.Tensor) -> bool:
        return bool(self.points) and self.points[-1][1].shape == like.shape

    def can_extrapolate(self, like: torch.Tensor) -> bool:
        return self.extrapolate and len(self.points) == 2 and self.ready(like)

    def last(self) -> torch.Tensor:
        return self.points[-1][1]

    def predict(self, sigma: float) -> torch.Tensor:
        s1, v1 = self.points[-1]
        if not self.extrapolate or len(self.points) < 2 or self.points[0][1].shape != v1.shape:
            return v1.clone()
        s0, v0 = self.points[0]
        if s1 == s0:
            return v1.clone()
        return v1 + (v1 - v0) * ((float(sigma) - s1) / (s1 - s0))


class CacheState:
    """One stream's cache. Every policy probes a model call with what it computes first (the step
    policy: the model input; block and chunk: the first block's residual; the U-Net: the shallow
    feature), and `decide(probe, step, steps)` turns the probe's change since the last computed
    step into the Mode of the rest of the call, kept in `mode`. Outside the step window it is
    always COMPUTE; inside, each policy's `_choose` decides."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        self.config, self.profile, self.stats, self.groups = config, profile, stats, groups
        self.consecutive = 0  # skips in a row
        self.mode = Mode.COMPUTE

    def decide(self, probe: torch.Tensor, step: int, steps: int) -> Mode:
        self.mode = self._choose(probe, step) if in_window(step, steps, self.config) else Mode.COMPUTE
        return self.mode

    def _choose(self, probe: torch.Tensor, step: int) -> Mode:
        raise NotImplementedError

    def _skip_if_below(self, change: float) -> Mode:
        return Mode.SKIP if change < self.config.threshold else Mode.COMPUTE

    def _profile_allows(self, step: int) -> bool:
        """A profile gates block and deep skipping too: steps measured to change a lot always compute."""
        return self.profile is None or self.profile.change[step] < self.config.threshold


# ----------------------------------------------------------------------------- statistics


@dataclass
class CacheStats:
    """What one sampling run skipped, and how long the model took."""

    calls: int = 0
    steps_skipped: int = 0
    blocks: int = 0
    blocks_skipped: int = 0
    chunks: int = 0
    chunks_skipped: int = 0
    full_seconds: list = field(default_factory=list)  # wall time of calls that computed everything
    seconds: float = 0.0  # wall time of all calls

    def add_call(self, seconds: float, full: bool):
        self.calls += 1
        self.seconds += seconds
        if full:
            self.full_seconds.append(seconds)

    def measured_speedup(self) -> float | None:
        """Uncached time estimated from the full calls' median, over the time actually spent."""
        if not self.full_seconds or self.seconds <= 0:
            return None
        median = sorted(self.full_seconds)[len(self.full_seconds) // 2]
        return median * self.calls / self.seconds

    def summary(self, name: str = "FastGen Cache") -> str:
        parts = [f"skipped {self.steps_skipped}/{self.calls} model calls"]
        if self.blocks:
            parts.append(f"{self.blocks_skipped}/{self.blocks} blocks")
        if self.chunks:
            parts.append(f"{self.chunks_skipped}/{self.chunks} chunk-blocks")
        speedup = self.measured_speedup()
        timing = f"model time {self.seconds:.2f}s" + (f", measured speedup {speedup:.2f}x" if speedup else "")
        return f"{name}: {', '.join(parts)}; {timing}"

    def as_dict(self) -> dict:
        out = asdict(self)
        out["measured_speedup"] = self.measured_speedup()
        out.pop("full_seconds")
        return out


class Timer:
    """Wall time of a `with` block; `sync` (e.g. a device synchronize) runs at both ends so queued
    device work is counted where it was issued."""

    def __init__(self, sync=None):
        self.sync = sync
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self):
        if self.sync:
            self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self.start
