"""Cache policies: skip work that barely changes between denoising steps. Host-free.

Three policies, each pure decision logic plus per-stream state (a *stream* is one batched model
call pattern, e.g. the cond+uncond batch of CFG: its state never mixes with another's):

- **step**: reuse the whole model output (EasyCache / TeaCache / MagCache family). Whether a step
  can be skipped comes from an error model: with a calibration profile, the per-step relative
  output changes measured once for this model and schedule (summed since the last computed step);
  without one, the online estimate `k * |x - x_ref| / |out_ref|` where k, the ratio of output to
  input change, is re-measured on every computed step. A skipped step's output is the last one
  extrapolated linearly in sigma (first-order, from the last two computed outputs), which tracks
  the slow drift of the velocity far better than plain reuse.
- **block**: the first block always runs; when its residual moved less than the threshold since
  the last computed step, the remaining blocks are skipped and their cached residual is added
  (First Block Cache). Works on any block chain through `BlockCacheState.first / middle / last`;
  on U-Nets `DeepCacheState` reuses the deep feature under the shallowest blocks (DeepCache).
- **chunk**: the latent's tokens are grouped in spatial (and temporal) chunks; after the first
  block, only the chunks whose first-block residual moved beyond the threshold run through the
  remaining blocks (gathered as a shorter sequence); the others take their cached residual. With
  threshold 0 every chunk runs: exact.

Every policy: threshold 0 never skips (the estimate is never < 0), the first and last steps always
compute, `start` / `end` bound the window (fractions of the steps), `max_skips` bounds the
consecutive skips. With <= 8 steps (few-step students) caching is off unless a calibration profile
for that schedule exists.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

POLICIES = {
    "step": "skip whole model calls (output extrapolated from the last computed ones)",
    "block": "always run the first block; skip the rest when its residual barely moved (First Block Cache; "
             "DeepCache-like on SD-family UNets)",
    "chunk": "run the remaining blocks only on the spatial/temporal chunks whose first-block residual moved",
}
FEW_STEPS = 8  # at or below this many steps, caching needs a calibration profile
PROFILE_TOLERANCE = 1e-3  # sigmas of a profile match a schedule within this


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


# ----------------------------------------------------------------------------- steps and windows


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


def relative_change(new: torch.Tensor, ref: torch.Tensor, dims=None) -> torch.Tensor:
    """mean |new - ref| / mean |ref| (over `dims`, all by default); 0/0 counts as no change."""
    dims = tuple(range(new.ndim)) if dims is None else dims
    num = (new.float() - ref.float()).abs().mean(dim=dims)
    den = ref.float().abs().mean(dim=dims)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.where(num > 0, torch.full_like(num, math.inf), num))


def per_sample_change(new: torch.Tensor, ref: torch.Tensor, groups: int) -> float:
    """The largest relative change over `groups` equal batch slices (cond / uncond chunks): a call
    is only as skippable as its most-changed conditioning."""
    changes = [relative_change(n, r) for n, r in zip(new.chunk(groups), ref.chunk(groups), strict=True)]
    return float(max(changes))


# ----------------------------------------------------------------------------- calibration profile


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
            reuse = Reuse(extrapolate=True)
            reuse.points = list(history)
            curvature = per_sample_change(reuse.predict(sigma), output, groups)
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
    def __init__(self, sync=None):
        self.sync = sync

    def __enter__(self):
        if self.sync:
            self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self.t0


# ----------------------------------------------------------------------------- error model + reuse


class Reuse:
    """The last two computed values of one quantity with their sigmas; predicts it at a new sigma
    by linear extrapolation (or plain reuse with one value, or when asked to)."""

    def __init__(self, extrapolate: bool):
        self.extrapolate = extrapolate
        self.points: list[tuple[float, torch.Tensor]] = []

    def store(self, sigma: float, value: torch.Tensor):
        self.points = (self.points + [(float(sigma), value.detach().clone())])[-2:]

    def ready(self, like: torch.Tensor) -> bool:
        return bool(self.points) and self.points[-1][1].shape == like.shape

    def predict(self, sigma: float) -> torch.Tensor:
        s1, v1 = self.points[-1]
        if not self.extrapolate or len(self.points) < 2 or self.points[0][1].shape != v1.shape:
            return v1.clone()
        s0, v0 = self.points[0]
        if s1 == s0:
            return v1.clone()
        return v1 + (v1 - v0) * ((float(sigma) - s1) / (s1 - s0))


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


# ----------------------------------------------------------------------------- step policy


class StepCacheState:
    """One stream's step cache. `run(x, sigma, step, steps, compute)` returns the output, computing
    it with `compute()` or predicting it from the cache."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        self.config, self.stats, self.groups = config, stats, groups
        self.error = ErrorModel(profile, config.extrapolate)
        self.reuse = Reuse(config.extrapolate)
        self.consecutive = 0

    def should_skip(self, x: torch.Tensor, step: int, steps: int) -> bool:
        if not in_window(step, steps, self.config) or self.consecutive >= self.config.max_skips:
            return False
        if not self.reuse.ready(x):
            return False
        return self.error.estimate(step, x, self.groups) < self.config.threshold

    def run(self, x: torch.Tensor, sigma: float, step: int, steps: int, compute) -> torch.Tensor:
        if self.should_skip(x, step, steps):
            self.consecutive += 1
            self.stats.steps_skipped += 1
            return self.reuse.predict(sigma).to(x.dtype)
        out = compute()
        self.consecutive = 0
        # what a skip would have predicted here: measures the extrapolation error as it goes
        predicted = self.reuse.predict(sigma) if self.reuse.extrapolate and len(self.reuse.points) == 2 and self.reuse.ready(out) else None
        self.error.computed(step, x, out, self.groups, predicted)
        self.reuse.store(sigma, out)
        return out


# ----------------------------------------------------------------------------- block and chunk policies


def chunk_map(grid: tuple[int, int, int], chunk_tokens: int, chunk_frames: int) -> torch.Tensor:
    """Chunk id of every token of a (frames, height, width) token grid in row-major order."""
    t, h, w = grid
    ft = torch.arange(t) // chunk_frames
    fh = torch.arange(h) // chunk_tokens
    fw = torch.arange(w) // chunk_tokens
    nh, nw = (h + chunk_tokens - 1) // chunk_tokens, (w + chunk_tokens - 1) // chunk_tokens
    ids = (ft[:, None, None] * nh + fh[None, :, None]) * nw + fw[None, None, :]
    return ids.reshape(-1)


class BlockCacheState:
    """One stream's block or chunk cache over a chain of blocks acting on tokens h [B, L, C].

    Per model call: `begin(step, steps, sigma, grid)`, then for the first block
    `first(h_in, h_out, base)`, for each middle block `middle(h, run)`, for the last
    `last(h, run)`. `run(h, index)` runs the block on the tokens h (all of them when index is
    None, else the gathered tokens at those positions). `base` is the state right after the first
    block in the last block's output format (for chains whose format changes, e.g. Flux)."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        self.config, self.profile, self.stats, self.groups = config, profile, stats, groups
        self.depth = 2
        self.residual = Reuse(config.extrapolate)  # remaining blocks' residual
        self.first_ref = None  # first-block residual at the last compute (per token)
        self.consecutive = None  # skips in a row: scalar (block) or per chunk (chunk)
        self.mode = "compute"

    def begin(self, step: int, steps: int, sigma: float, grid: tuple[int, int, int] | None = None):
        self.step, self.steps, self.sigma, self.grid = step, steps, float(sigma), grid
        self.mode, self.index = "compute", None

    def _eligible(self) -> bool:
        if not in_window(self.step, self.steps, self.config):
            return False
        # a profile gates block / chunk skipping too: steps measured to change a lot always compute
        return self.profile is None or self.profile.change[self.step] < self.config.threshold

    def first(self, h_in: torch.Tensor, h_out: torch.Tensor, base: torch.Tensor | None = None):
        self.h_first = h_out
        self.base = h_out if base is None else base
        res = h_out - h_in
        self.res_first = res
        usable = self._eligible() and self.first_ref is not None and self.first_ref.shape == res.shape and self.residual.ready(self.base)
        if self.config.policy == "chunk" and self.grid is not None:
            self._choose_chunks(res, usable)
        elif usable and (self.consecutive or 0) < self.config.max_skips:
            change = per_sample_change(res, self.first_ref, self.groups)
            if change < self.config.threshold:
                self.mode = "skip"

    def _choose_chunks(self, res: torch.Tensor, usable: bool):
        ids = chunk_map(self.grid, self.config.chunk_tokens, self.config.chunk_frames).to(res.device)
        if ids.numel() != res.shape[1]:
            return  # tokens are not the latent grid (extra tokens): compute everything
        count = int(ids.max()) + 1
        self.ids, self.count = ids, count
        if self.consecutive is None or not torch.is_tensor(self.consecutive) or self.consecutive.numel() != count:
            self.consecutive = torch.zeros(count, dtype=torch.long)
        if not usable:
            return
        # per chunk, per conditioning slice: relative change of the first-block residual
        diff = (res.float() - self.first_ref.float()).abs().mean(-1)  # [B, L]
        ref = self.first_ref.float().abs().mean(-1)
        b = res.shape[0]
        num = torch.zeros(b, count, device=res.device).index_add_(1, ids, diff)
        den = torch.zeros(b, count, device=res.device).index_add_(1, ids, ref)
        change = torch.where(den > 0, num / den.clamp_min(1e-12), torch.where(num > 0, torch.full_like(num, math.inf), num))
        worst = change.amax(0).cpu()  # a chunk is as changed as its most-changed batch entry
        skip = (worst < self.config.threshold) & (self.consecutive < self.config.max_skips)
        if skip.all():
            self.mode = "skip"
        elif skip.any():
            self.mode = "partial"
            self.skip_chunks = skip
            changed = ~skip
            # the chunks around the changed ones run too, as attention context, but keep their cache
            run_chunks = self._dilate(changed) if self.config.chunk_context else changed
            self.index = torch.nonzero(run_chunks.to(ids.device)[ids]).reshape(-1)
            self.keep = torch.nonzero(changed.to(ids.device)[ids]).reshape(-1)
            self.run_chunks = run_chunks.cpu()

    def _dilate(self, chunks: torch.Tensor) -> torch.Tensor:
        """Chunks within `chunk_context` chunks (in frames, rows, columns) of a marked one."""
        t, h, w = self.grid
        c, f = self.config.chunk_tokens, self.config.chunk_frames
        shape = (-(-t // f), -(-h // c), -(-w // c))
        r = self.config.chunk_context
        grown = torch.nn.functional.max_pool3d(chunks.float().reshape(1, 1, *shape), 2 * r + 1, stride=1, padding=r)
        return grown.reshape(-1) > 0

    def middle(self, h: torch.Tensor, run) -> torch.Tensor:
        if self.mode == "skip":
            return h
        if self.mode == "partial":
            return h.index_copy(1, self.index, run(h.index_select(1, self.index), self.index))
        return run(h, None)

    def last(self, h: torch.Tensor, run) -> torch.Tensor:
        self.stats.blocks += self.depth
        if self.mode == "skip":
            self.stats.blocks_skipped += self.depth - 1
            self._count_chunks(skipped_all=True)
            self._bump_consecutive(skipped_all=True)
            return h + self.residual.predict(self.sigma).to(h.dtype)
        out = self.middle(h, run) if self.mode == "partial" else run(h, None)
        if self.mode == "partial":
            # skipped chunks: first-block state + their cached residual; run chunks: fresh residual
            predicted = self.base + self.residual.predict(self.sigma).to(h.dtype)
            keep = self.keep
            out = predicted.index_copy(1, keep, out.index_select(1, keep))
            fresh = self.residual.points[-1][1].clone() if self.residual.points else out - self.base
            fresh.index_copy_(1, keep, (out - self.base).index_select(1, keep))
            ref = self.first_ref.clone()
            ref.index_copy_(1, keep, self.res_first.index_select(1, keep))
            self._store(fresh, ref, keep_history=True)
        else:
            self._store(out - self.base, self.res_first, keep_history=False)
        self._count_chunks(skipped_all=False)
        self._bump_consecutive(skipped_all=False)
        return out

    def set_depth(self, blocks: int):
        """Total blocks in the chain (for the statistics)."""
        self.depth = blocks

    def _store(self, residual, first_ref, keep_history: bool):
        if keep_history:
            # a partly recomputed residual is not a clean sample at this sigma: reuse only, no slope
            self.residual.points = [(self.sigma, residual.detach().clone())]
        else:
            self.residual.store(self.sigma, residual)
        self.first_ref = first_ref.detach().clone()

    def _count_chunks(self, skipped_all: bool):
        if self.config.policy != "chunk" or self.grid is None or not hasattr(self, "count"):
            return
        # counted per chunk and per block after the first (the first always runs on every chunk)
        blocks = self.depth - 1
        self.stats.chunks += self.count * blocks
        if skipped_all:
            self.stats.chunks_skipped += self.count * blocks
        elif self.mode == "partial":  # context chunks ran: only the chunks not run count as skipped
            self.stats.chunks_skipped += int((~self.run_chunks).sum()) * blocks

    def _bump_consecutive(self, skipped_all: bool):
        if torch.is_tensor(self.consecutive):
            if skipped_all:
                self.consecutive += 1
            elif self.mode == "partial":
                self.consecutive = torch.where(self.skip_chunks, self.consecutive + 1, torch.zeros_like(self.consecutive))
            else:
                self.consecutive.zero_()
        else:
            self.consecutive = (self.consecutive or 0) + 1 if skipped_all else 0


class DeepCacheState:
    """One stream's deep-feature cache for U-Nets (DeepCache-like): the shallowest input block
    always runs; when its output moved less than the threshold since the last full call, the deep
    part (the other input blocks, the middle, all output blocks but the last) is skipped and the
    feature that entered the last output block is reused (extrapolated in sigma like the step
    policy's output)."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        self.config, self.profile, self.stats, self.groups = config, profile, stats, groups
        self.deep = Reuse(config.extrapolate)
        self.shallow_ref = None
        self.consecutive = 0

    def should_skip(self, shallow: torch.Tensor, step: int, steps: int) -> bool:
        if not in_window(step, steps, self.config) or self.consecutive >= self.config.max_skips:
            return False
        if self.profile is not None and self.profile.change[step] >= self.config.threshold:
            return False
        if self.shallow_ref is None or self.shallow_ref.shape != shallow.shape or not self.deep.points:
            return False
        return per_sample_change(shallow, self.shallow_ref, self.groups) < self.config.threshold

    def skipped(self, blocks: int, run_blocks: int):
        self.consecutive += 1
        self.stats.blocks += blocks
        self.stats.blocks_skipped += blocks - run_blocks

    def computed(self, sigma: float, shallow: torch.Tensor, deep: torch.Tensor, blocks: int):
        self.consecutive = 0
        self.stats.blocks += blocks
        self.shallow_ref = shallow.detach().clone()
        self.deep.store(sigma, deep)


def run_block_chain(state: BlockCacheState, h: torch.Tensor, blocks) -> torch.Tensor:
    """Drive a plain list of blocks `block(h) -> h` (all tokens per-token independent of position
    arguments) through a block / chunk cache state, as the host's block replacement does."""
    n = len(blocks)
    state.set_depth(n)
    h_out = blocks[0](h)
    state.first(h, h_out)
    if n == 1:
        return h_out
    h = h_out
    for block in blocks[1:-1]:
        h = state.middle(h, lambda t, index, block=block: block(t))
    return state.last(h, lambda t, index: blocks[-1](t))


# ----------------------------------------------------------------------------- one sampling run


class CacheRun:
    """All streams of one sampling run: a fresh one per run, so nothing leaks between runs; one
    state per stream key (the tuple of conditionings batched in the call), so cond and uncond
    batches never share cached tensors."""

    def __init__(self, config: CacheConfig, sample_sigmas, profiles=None):
        """`profiles`: one ChangeProfile, a list of them (calibrations of several schedules) or None;
        the one whose sigmas match this run's is used."""
        self.config = config
        self.sample_sigmas = [float(s) for s in sample_sigmas]
        self.steps = max(len(self.sample_sigmas) - 1, 1)
        profiles = [profiles] if isinstance(profiles, ChangeProfile) else list(profiles or [])
        self.profile = next((p for p in reversed(profiles) if p.matches(self.sample_sigmas)), None)
        self.unmatched_profiles = len(profiles) if self.profile is None else 0
        self.enabled, self.reason = caching_allowed(self.steps, self.profile)
        self.stats = CacheStats()
        self.streams: dict = {}

    def stream(self, key, groups: int = 1, kind: str = "blocks"):
        state = self.streams.get(key)
        if state is None:
            if self.config.policy == "step":
                state = StepCacheState(self.config, self.profile, self.stats, groups)
            elif kind == "unet":
                state = DeepCacheState(self.config, self.profile, self.stats, groups)
            else:
                state = BlockCacheState(self.config, self.profile, self.stats, groups)
            self.streams[key] = state
        return state

    def step_of(self, sigma: float) -> tuple[int, int]:
        return step_index(sigma, self.sample_sigmas)


# ----------------------------------------------------------------------------- the embedded DiT, host-free


def digit_forward(net, x: torch.Tensor, sigma: torch.Tensor, class_weights: torch.Tensor, run: CacheRun | None,
                  key="default", groups: int = 1) -> torch.Tensor:
    """DigitDiT.forward under a cache run (None: uncached). What the host adapter does through
    block replacement, here on the core network: used by the tests and the synthetic benchmarks."""
    if run is None or not run.enabled:
        return net(x, sigma, class_weights)
    step, steps = run.step_of(float(sigma.reshape(-1)[0]))
    state = run.stream(key, groups)
    with Timer() as timer:
        if run.config.policy == "step":
            out = state.run(x, float(sigma.reshape(-1)[0]), step, steps, lambda: net(x, sigma, class_weights))
            full = state.consecutive == 0
        else:
            p = net.config.patch_size
            state.begin(step, steps, float(sigma.reshape(-1)[0]), (1, x.shape[-2] // p, x.shape[-1] // p))
            tokens, c = net.embed(x, sigma, class_weights)
            blocks = [lambda h, block=block: block(h, c) for block in net.blocks]
            out = net.head(run_block_chain(state, tokens, blocks), c, x.shape[-2], x.shape[-1])
            full = state.mode == "compute"
    run.stats.add_call(timer.seconds, full)
    return out
