"""Cache policies: skip work that barely changes between denoising steps. Host-free.

Three policies, each pure decision logic plus per-stream state (a *stream* is one batched model
call pattern, e.g. the cond+uncond batch of CFG: its state never mixes with another's):

- **step** (step.py): reuse the whole model output, extrapolated in sigma, when an error model
  (online, or from a calibration profile) says the output barely changes.
- **block** (blocks.py): the first block always runs; when its residual barely moved, the remaining
  blocks are skipped and their cached residual is added (First Block Cache). On U-Nets the
  deep-feature cache reuses the deep feature under the shallowest blocks (DeepCache).
- **chunk** (blocks.py): after the first block, only the chunks of the latent whose first-block
  residual moved run through the remaining blocks.

Every state answers one question per model call, `decide(probe, step, steps) -> Mode`, from the
relative change (base.relative_change) of what the call computed first. Every policy: threshold 0
never skips (the estimate is never < 0), the first and last steps always compute, `start` / `end`
bound the window (fractions of the steps), `max_skips` bounds the consecutive skips. With <= 8
steps (few-step students) caching is off unless a calibration profile (profile.py) for that
schedule exists. run.py holds one sampling run's streams.
"""

from .base import (
    FEW_STEPS,
    POLICIES,
    CacheConfig,
    CacheState,
    CacheStats,
    Mode,
    Reuse,
    Timer,
    in_window,
    per_sample_change,
    relative_change,
    step_index,
)
from .blocks import BlockCacheState, ChunkCacheState, DeepCacheState, chunk_map, run_block_chain
from .profile import PROFILE_TOLERANCE, ChangeProfile, ProfileRecorder, caching_allowed
from .run import STATES, CacheRun, digit_forward
from .step import ErrorModel, StepCacheState

__all__ = [
    "FEW_STEPS", "POLICIES", "PROFILE_TOLERANCE", "STATES", "BlockCacheState", "CacheConfig", "CacheRun", "CacheState",
    "CacheStats", "ChangeProfile", "ChunkCacheState", "DeepCacheState", "ErrorModel", "Mode", "ProfileRecorder", "Reuse",
    "StepCacheState", "Timer", "caching_allowed", "chunk_map", "digit_forward", "in_window", "per_sample_change",
    "relative_change", "run_block_chain", "step_index",
]
