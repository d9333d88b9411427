"""The block and chunk policies over a chain of blocks acting on tokens h [B, L, C], and the
deep-feature cache that stands in for the block policy on U-Nets.

- **block** (First Block Cache): the first block always runs; when its residual moved less than the
  threshold since the last computed step, the remaining blocks are skipped and their cached
  residual is added.
- **chunk**: the latent's tokens are grouped in spatial (and temporal) chunks; after the first
  block, only the chunks whose first-block residual moved beyond the threshold run through the
  remaining blocks (gathered as a shorter sequence); the others take their cached residual. With
  threshold 0 every chunk runs: exact.
- **deep** (DeepCache, U-Nets): the shallowest input block always runs; when its output barely
  moved, the deep part is skipped and its cached feature feeds the last output block.
"""

from __future__ import annotations

import torch

from .base import CacheConfig, CacheState, CacheStats, Mode, Reuse, per_sample_change, relative_change
from .profile import ChangeProfile


def chunk_map(grid: tuple[int, int, int], chunk_tokens: int, chunk_frames: int) -> torch.Tensor:
    """Chunk id of every token of a (frames, height, width) token grid in row-major order."""
    t, h, w = grid
    ft = torch.arange(t) // chunk_frames
    fh = torch.arange(h) // chunk_tokens
    fw = torch.arange(w) // chunk_tokens
    nh, nw = (h + chunk_tokens - 1) // chunk_tokens, (w + chunk_tokens - 1) // chunk_tokens
    ids = (ft[:, None, None] * nh + fh[None, :, None]) * nw + fw[None, None, :]
    return ids.reshape(-1)


class BlockCacheState(CacheState):
    """One stream's block cache, probed with the first block's residual.

    Per model call: `begin(step, steps, sigma, grid)`, then for the first block
    `first(h_in, h_out, base)`, for each middle block `middle(h, run)`, for the last
    `last(h, run)`. `run(h, index)` runs the block on the tokens h (all of them when index is
    None, else the gathered tokens at those positions). `base` is the state right after the first
    block in the last block's output format (for chains whose format changes, e.g. Flux)."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        super().__init__(config, profile, stats, groups)
        self.depth = 2  # blocks in the chain, for the statistics
        self.residual = Reuse(config.extrapolate)  # what the blocks after the first add
        self.first_ref: torch.Tensor | None = None  # the first block's residual at the last compute
        # the model call under way
        self.step, self.steps, self.sigma = 0, 1, 0.0
        self.grid: tuple[int, int, int] | None = None
        self.base: torch.Tensor | None = None
        self.first_residual: torch.Tensor | None = None

    def set_depth(self, blocks: int):
        """Total blocks in the chain (for the statistics)."""
        self.depth = blocks

    def begin(self, step: int, steps: int, sigma: float, grid: tuple[int, int, int] | None = None):
        self.step, self.steps, self.sigma, self.grid = step, steps, float(sigma), grid
        self.mode = Mode.COMPUTE

    def first(self, h_in: torch.Tensor, h_out: torch.Tensor, base: torch.Tensor | None = None):
        self.base = h_out if base is None else base
        self.first_residual = h_out - h_in
        self.decide(self.first_residual, self.step, self.steps)

    def _comparable(self, residual: torch.Tensor, step: int) -> bool:
        """A reference of this shape to compare with and a residual to reuse, on a step the
        profile (if any) allows."""
        return (self._profile_allows(step) and self.first_ref is not None and self.first_ref.shape == residual.shape
                and self.residual.ready(self.base))

    def _choose(self, residual: torch.Tensor, step: int) -> Mode:
        if self.consecutive >= self.config.max_skips or not self._comparable(residual, step):
            return Mode.COMPUTE
        return self._skip_if_below(per_sample_change(residual, self.first_ref, self.groups))

    def middle(self, h: torch.Tensor, run) -> torch.Tensor:
        return h if self.mode is Mode.SKIP else run(h, None)

    def last(self, h: torch.Tensor, run) -> torch.Tensor:
        self.stats.blocks += self.depth
        if self.mode is Mode.SKIP:
            self.stats.blocks_skipped += self.depth - 1
            self._end_call()
            return h + self.residual.predict(self.sigma).to(h.dtype)
        out = run(h, None)
        self.residual.store(self.sigma, out - self.base)
        self.first_ref = self.first_residual.detach().clone()
        self._end_call()
        return out

    def _end_call(self):
        """After the last block: the skips in a row."""
        self.consecutive = self.consecutive + 1 if self.mode is Mode.SKIP else 0


class ChunkCacheState(BlockCacheState):
    """One stream's chunk cache: the block cache decided per chunk of the token grid. A call
    without a grid (`begin(..., grid=None)`: the adapter has none for it, e.g. per-frame timesteps)
    is decided as a whole, like the block cache; one with more tokens than its grid computes
    everything."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        super().__init__(config, profile, stats, groups)
        self.chunk_consecutive = torch.zeros(0, dtype=torch.long)  # skips in a row, per chunk
        # the model call under way
        self.ids: torch.Tensor | None = None  # chunk id of every token (None: no chunks this call)
        self.count = 0  # chunks
        self.skip_chunks = torch.zeros(0, dtype=torch.bool)  # chunks whose cached output is used
        self.run_chunks = torch.zeros(0, dtype=torch.bool)  # chunks that run: the changed ones and their context
        self.index = torch.zeros(0, dtype=torch.long)  # tokens that run (gathered)
        self.keep = torch.zeros(0, dtype=torch.long)  # tokens whose fresh output is kept (the changed chunks)

    def begin(self, step: int, steps: int, sigma: float, grid: tuple[int, int, int] | None = None):
        super().begin(step, steps, sigma, grid)
        self.ids, self.count = None, 0

    def first(self, h_in: torch.Tensor, h_out: torch.Tensor, base: torch.Tensor | None = None):
        if self.grid is not None:
            ids = chunk_map(self.grid, self.config.chunk_tokens, self.config.chunk_frames).to(h_out.device)
            if ids.numel() == h_out.shape[1]:
                self.ids, self.count = ids, int(ids.max()) + 1
                if self.chunk_consecutive.numel() != self.count:
                    self.chunk_consecutive = torch.zeros(self.count, dtype=torch.long)
        super().first(h_in, h_out, base)

    def _choose(self, residual: torch.Tensor, step: int) -> Mode:
        if self.grid is None:
            return super()._choose(residual, step)
        if self.ids is None or not self._comparable(residual, step):  # no ids: extra tokens beside the grid
            return Mode.COMPUTE
        change = relative_change(residual, self.first_ref, dims=-1, chunks=(self.ids, self.count))
        worst = change.amax(0).cpu()  # a chunk is as changed as its most-changed batch entry
        skip = (worst < self.config.threshold) & (self.chunk_consecutive < self.config.max_skips)
        if skip.all():
            return Mode.SKIP
        if not skip.any():
            return Mode.COMPUTE
        changed = ~skip
        # the chunks around the changed ones run too, as attention context, but keep their cache
        run_chunks = self._dilate(changed) if self.config.chunk_context else changed
        self.skip_chunks, self.run_chunks = skip, run_chunks.cpu()
        self.index = torch.nonzero(run_chunks.to(self.ids.device)[self.ids]).reshape(-1)
        self.keep = torch.nonzero(changed.to(self.ids.device)[self.ids]).reshape(-1)
        return Mode.PARTIAL

    def _dilate(self, chunks: torch.Tensor) -> torch.Tensor:
        """Chunks within `chunk_context` chunks (in frames, rows, columns) of a marked one."""
        t, h, w = self.grid
        c, f = self.config.chunk_tokens, self.config.chunk_frames
        shape = (-(-t // f), -(-h // c), -(-w // c))
        r = self.config.chunk_context
        grown = torch.nn.functional.max_pool3d(chunks.float().reshape(1, 1, *shape), 2 * r + 1, stride=1, padding=r)
        return grown.reshape(-1) > 0

    def middle(self, h: torch.Tensor, run) -> torch.Tensor:
        if self.mode is Mode.PARTIAL:
            return h.index_copy(1, self.index, run(h.index_select(1, self.index), self.index))
        return super().middle(h, run)

    def last(self, h: torch.Tensor, run) -> torch.Tensor:
        if self.mode is not Mode.PARTIAL:
            return super().last(h, run)
        self.stats.blocks += self.depth
        ran = self.middle(h, run)
        # skipped chunks: first-block state + their cached residual; run chunks: fresh residual
        out = (self.base + self.residual.predict(self.sigma).to(h.dtype)).index_copy(1, self.keep, ran.index_select(1, self.keep))
        fresh = self.residual.last().clone()
        fresh.index_copy_(1, self.keep, (out - self.base).index_select(1, self.keep))
        # a partly recomputed residual is not a clean sample at this sigma: reuse only, no slope
        self.residual.restart(self.sigma, fresh)
        self.first_ref = self.first_ref.clone().index_copy_(1, self.keep, self.first_residual.detach().index_select(1, self.keep))
        self._end_call()
        return out

    def _end_call(self):
        """After the last block: skips in a row per chunk, and the chunk statistics, per chunk and
        per block after the first (the first always runs on every chunk)."""
        super()._end_call()
        if self.ids is None:
            return
        blocks = self.depth - 1
        self.stats.chunks += self.count * blocks
        if self.mode is Mode.SKIP:
            self.stats.chunks_skipped += self.count * blocks
            self.chunk_consecutive += 1
        elif self.mode is Mode.PARTIAL:  # context chunks ran: only the chunks not run count as skipped
            self.stats.chunks_skipped += int((~self.run_chunks).sum()) * blocks
            self.chunk_consecutive = torch.where(self.skip_chunks, self.chunk_consecutive + 1, torch.zeros_like(self.chunk_consecutive))
        else:
            self.chunk_consecutive.zero_()


class DeepCacheState(CacheState):
    """One stream's deep-feature cache for U-Nets (DeepCache-like), probed with the shallowest
    input block's output: when it moved less than the threshold since the last full call, the deep
    part (the other input blocks, the middle, all output blocks but the last) is skipped and the
    feature that entered the last output block is reused (extrapolated in sigma like the step
    policy's output). The caller runs the call: `decide(shallow, step, steps)`, then `skipped` or
    `computed`."""

    def __init__(self, config: CacheConfig, profile: ChangeProfile | None, stats: CacheStats, groups: int = 1):
        super().__init__(config, profile, stats, groups)
        self.deep = Reuse(config.extrapolate)
        self.shallow_ref: torch.Tensor | None = None

    def _choose(self, shallow: torch.Tensor, step: int) -> Mode:
        if self.consecutive >= self.config.max_skips or not self._profile_allows(step):
            return Mode.COMPUTE
        if self.shallow_ref is None or self.shallow_ref.shape != shallow.shape or not self.deep.points:
            return Mode.COMPUTE
        return self._skip_if_below(per_sample_change(shallow, self.shallow_ref, self.groups))

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
