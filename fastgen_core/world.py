"""The causal video loop: chunk after chunk, each denoised in a few steps while attending to the
cached keys and values of the chunks before it (CausVid, Self-Forcing).

    model = CausalWorldDiT(...)
    cache = KVCache(sink_frames=3, window_frames=12)
    for chunk in rollout(model, cache, chunks=100, chunk_frames=3, schedule=ChunkSchedule.few_step(4)):
        show(chunk.latents)          # [B, C, F, H, W], in order, with chunk.seconds

After a chunk is final its clean frames are run once more at noise level 0 (or a small context
noise) and their keys and values go into the cache: later chunks see exactly what a full forward
of the clean sequence under the block-causal mask would show them. The cache keeps `sink_frames`
(the first frames) and a rolling window of the latest `window_frames`, so memory stays flat
however long the video runs. Host-free: the model is any callable with the
`model(x, sigma, actions, cache, write_cache)` convention of `networks.CausalWorldDiT`, returning
the clean frames when `model.config.prediction == "x0"`, else the flow velocity.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import sampling


class KVCache:
    """Keys and values of the context frames, per layer: the sink (first frames, kept for good)
    and a rolling window of the most recent frames.

    Keys are stored without their rotary position; `context(layer)` hands them out with the
    positions of their slots (sink 0..S-1, then the window), so positions stay bounded however
    many frames have gone by, and equal the true frame indices until the first eviction.
    """

    def __init__(self, sink_frames: int = 0, window_frames: int | None = None, token_dim: int = 2):
        """`token_dim`: the token axis of the stored tensors ([B, H, N, hd]: 2; the host's
        attention layout [B, N, C]: 1)."""
        if window_frames is not None and window_frames < 1:
            raise ValueError("window_frames must be at least 1 (or None for an unbounded cache)")
        self.sink_frames, self.window_frames, self.token_dim = sink_frames, window_frames, token_dim
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.positions: torch.Tensor | None = None  # [B, N, P] per-token positions, for models that give them
        self.frames = 0  # frames held now
        self.frames_seen = 0  # frames appended in total
        self.evicted = 0

    def context(self, layer: int):
        if not self.layers:
            return None
        k, v = self.layers[layer]
        positions = torch.arange(self.frames, device=k.device).repeat_interleave(k.shape[self.token_dim] // self.frames)
        if self.positions is not None:  # the stored positions with the frame slot in column 0
            positions = torch.cat([positions.to(self.positions.dtype).expand(self.positions.shape[0], -1)[..., None],
                                   self.positions[..., 1:]], dim=-1)
        return k, v, positions

    def append(self, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]], frames: int, positions: torch.Tensor | None = None):
        """Add one chunk's keys and values (frames * tokens along `token_dim`, per layer), then
        evict the oldest non-sink frames beyond the window. `positions` [B, frames * tokens, P]:
        per-token positions kept beside them (column 0, the frame, is renumbered by `context`)."""
        dim = self.token_dim
        if positions is not None:
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        if self.layers:
            self.layers = [(torch.cat([k0, k], dim=dim), torch.cat([v0, v], dim=dim))
                           for (k0, v0), (k, v) in zip(self.layers, kv_per_layer, strict=True)]
        else:
            self.layers = [(k, v) for k, v in kv_per_layer]
        tokens = kv_per_layer[0][0].shape[dim] // frames
        self.frames += frames
        self.frames_seen += frames
        if self.window_frames is not None and self.frames > self.sink_frames + self.window_frames:
            drop = self.frames - self.sink_frames - self.window_frames
            start, stop = self.sink_frames * tokens, (self.sink_frames + drop) * tokens

            def keep(t):
                return torch.cat([t.narrow(dim, 0, start), t.narrow(dim, stop, t.shape[dim] - stop)], dim=dim).contiguous()

            self.layers = [(keep(k), keep(v)) for k, v in self.layers]
            if self.positions is not None:
                self.positions = torch.cat([self.positions[:, :start], self.positions[:, stop:]], dim=1)
            self.frames -= drop
            self.evicted += drop

    def move_origin(self, offset: torch.Tensor):
        """Measure the stored positions from a new origin: subtract offset [B, P - 1] from their
        columns after the frame (keeps the numbers small however far the camera travels; rotary
        scores depend on differences only)."""
        if self.positions is not None:
            self.positions = torch.cat([self.positions[..., :1], self.positions[..., 1:] - offset[:, None]], dim=-1)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def reset(self):
        self.layers, self.frames, self.frames_seen, self.evicted = [], 0, 0, 0
        self.positions = None


@dataclass
class ChunkSchedule:
    """Noise levels per chunk: the first chunk may take more steps (it has no context to lean on:
    the seeds' first-frame enhancement), later chunks fewer (diagonal distillation)."""

    first: list[float]  # sigmas ending in 0
    later: list[float]

    def sigmas(self, chunk: int) -> torch.Tensor:
        return torch.tensor(self.first if chunk == 0 else self.later, dtype=torch.float32)

    @classmethod
    def few_step(cls, steps: int = 4, first_steps: int | None = None, shift: float = 1.0) -> ChunkSchedule:
        return cls(sampling.flow_sigmas(first_steps or steps, shift).tolist(), sampling.flow_sigmas(steps, shift).tolist())

    @classmethod
    def for_recipe(cls, recipe, steps: int = 0) -> ChunkSchedule:
        """A world model's recipe (`fastgen_core.recipe.Recipe`, or None): its own noise levels (a
        distilled student's sigmas / timesteps), else `steps` evenly spaced under its shift. A
        `steps` other than the recipe's asks for evenly spaced levels instead."""
        if recipe is None:
            return cls.few_step(steps or 4)
        if steps and steps != recipe.steps or not (recipe.sigmas or recipe.timesteps):
            return cls.few_step(steps or recipe.steps, shift=recipe.shift or 1.0)
        levels = [float(v) for v in recipe.sigmas] if recipe.sigmas else [t / 1000.0 for t in recipe.timesteps]
        return cls(levels + [0.0], levels + [0.0])


@dataclass
class Chunk:
    index: int
    latents: torch.Tensor  # [B, C, F, H, W], the finished chunk
    first_frame: int  # index of its first frame in the whole video
    seconds: float  # wall time of this chunk (denoising + cache update + decode)
    frames: torch.Tensor | None = None  # decoded frames when a decoder was given
    actions: torch.Tensor | None = None  # [B, F] the actions it was generated under


def rollout(model, cache: KVCache, chunks: int | None, chunk_frames: int, schedule: ChunkSchedule,
            actions: Callable[[int, int], torch.Tensor] | torch.Tensor | None = None, batch: int = 1,
            frame_shape: tuple | None = None, context_noise: float = 0.0, sampler: str = "sde", seed: int = 0,
            decode: Callable[[torch.Tensor], torch.Tensor] | None = None, device=None,
            prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[Chunk]:
    """Generate chunk after chunk (forever when `chunks` is None), yielding each when final.

    `actions(first_frame, frames) -> LongTensor[B, frames]` is asked for each chunk's actions just
    before the chunk is generated (live input), or a tensor [B, T] gives them all up front.
    `sampler` "sde" re-noises with fresh noise between steps (DMD / consistency students), "ode"
    jumps deterministically. The noise comes from one generator seeded by `seed`.
    `prefix` = (frames [B, C, F0, H, W], actions [B, F0]): given frames (a start image or clip) that
    go into the cache first, `chunk_frames` at a time; generation continues after them.
    """
    config = model.config
    frame_shape = frame_shape or (config.in_channels, config.frame_size, config.frame_size)
    weight = next(model.parameters())
    device, dtype = device or weight.device, weight.dtype
    generator = torch.Generator().manual_seed(seed)
    predicts_x0 = getattr(config, "prediction", "velocity") == "x0"
    if prefix is not None:
        frames, prefix_actions = prefix
        with torch.no_grad():
            for start in range(0, frames.shape[2], chunk_frames):
                part = frames[:, :, start:start + chunk_frames].to(device, dtype)
                level = torch.zeros(part.shape[0], part.shape[2], device=device, dtype=dtype)
                model(part, level, prefix_actions[:, start:start + chunk_frames].to(device), cache, write_cache=True)
    index = 0
    while chunks is None or index < chunks:
        start = time.perf_counter()
        first = cache.frames_seen
        chunk_actions = _actions_for(actions, first, chunk_frames, batch).to(device)
        sigmas = schedule.sigmas(index).to(device)
        shape = (batch, frame_shape[0], chunk_frames, *frame_shape[1:])
        sigmas = sigmas.to(dtype)
        x = torch.randn(shape, generator=generator).to(device, dtype) * sigmas[0]

        def denoiser(x, sigma, chunk_actions=chunk_actions):
            sigma = sigma.reshape(-1)[:1].expand(batch)
            out = model(x, sigma[:, None].expand(batch, chunk_frames), chunk_actions, cache)
            return out if predicts_x0 else x - sigma.reshape(-1, 1, 1, 1, 1) * out

        with torch.no_grad():
            latents = sampling.sample_multistep(denoiser, x, sigmas, noise=sampler, generator=generator)
            context, level = latents, torch.full((batch, chunk_frames), float(context_noise), device=device, dtype=dtype)
            if context_noise > 0:
                noise = torch.randn(shape, generator=generator).to(device, dtype)
                context = (1.0 - context_noise) * latents + context_noise * noise
            model(context, level, chunk_actions, cache, write_cache=True)
            frames = decode(latents) if decode is not None else None
        yield Chunk(index, latents, first, time.perf_counter() - start, frames, chunk_actions.cpu())
        index += 1


def _actions_for(actions, first: int, frames: int, batch: int) -> torch.Tensor:
    if actions is None:
        return torch.zeros(batch, frames, dtype=torch.long)
    if callable(actions):
        out = torch.as_tensor(actions(first, frames), dtype=torch.long)
    else:
        if actions.shape[1] < first + frames:
            raise ValueError(f"actions cover {actions.shape[1]} frames; chunk {first}..{first + frames - 1} needs more")
        out = actions[:, first:first + frames]
    if out.shape != (batch, frames):
        raise ValueError(f"actions for frames {first}..{first + frames - 1} must be [{batch}, {frames}], got {list(out.shape)}")
    return out.long()
