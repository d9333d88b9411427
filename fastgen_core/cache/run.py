"""One sampling run's caches, and the embedded DiT driven through them without a host."""

from __future__ import annotations

import torch

from .base import CacheConfig, CacheStats, Mode, Timer, step_index
from .blocks import BlockCacheState, ChunkCacheState, DeepCacheState, run_block_chain
from .profile import ChangeProfile, caching_allowed
from .step import StepCacheState

STATES = {"step": StepCacheState, "block": BlockCacheState, "chunk": ChunkCacheState}  # per policy


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

    def stream(self, key, groups: int = 1, deep: bool = False):
        """The state of one stream, made at its first call. `deep`: the model is a U-Net, whose
        block and chunk policies run as the deep-feature cache."""
        state = self.streams.get(key)
        if state is None:
            kind = DeepCacheState if deep and self.config.policy != "step" else STATES[self.config.policy]
            state = self.streams[key] = kind(self.config, self.profile, self.stats, groups)
        return state

    def step_of(self, sigma: float) -> tuple[int, int]:
        return step_index(sigma, self.sample_sigmas)


def digit_forward(net, x: torch.Tensor, sigma: torch.Tensor, class_weights: torch.Tensor, run: CacheRun | None,
                  key="default", groups: int = 1) -> torch.Tensor:
    """DigitDiT.forward under a cache run (None: uncached). What the host adapter does through
    block replacement, here on the core network: used by the tests and the synthetic benchmarks."""
    if run is None or not run.enabled:
        return net(x, sigma, class_weights)
    value = float(sigma.reshape(-1)[0])
    step, steps = run.step_of(value)
    state = run.stream(key, groups)
    with Timer() as timer:
        if run.config.policy == "step":
            out = state.run(x, value, step, steps, lambda: net(x, sigma, class_weights))
        else:
            p = net.config.patch_size
            state.begin(step, steps, value, (1, x.shape[-2] // p, x.shape[-1] // p))
            tokens, c = net.embed(x, sigma, class_weights)
            blocks = [lambda h, block=block: block(h, c) for block in net.blocks]
            out = net.head(run_block_chain(state, tokens, blocks), c, x.shape[-2], x.shape[-1])
    run.stats.add_call(timer.seconds, state.mode is Mode.COMPUTE)
    return out
