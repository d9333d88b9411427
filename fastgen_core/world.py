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

    Storage: per layer one preallocated buffer of keys and one of values, the held frames in its
    first slots. `attend(layer, k, v)` writes a chunk's keys and values right after them and
    returns views over both, so attention needs no concatenation; `append` of keys already written
    there only moves the end. A buffer holds sink + window + one chunk once the window is full (it
    grows by doubling until then, and for ever when unbounded; `reserve` sizes it once up front),
    so a long video allocates nothing more and eviction is one move of the window part per chunk. The cache keeps no autograd
    history: cached forwards run under `torch.no_grad()`.
    """

    def __init__(self, sink_frames: int = 0, window_frames: int | None = None, token_dim: int = 2):
        """`token_dim`: the token axis of the stored tensors ([B, H, N, hd]: 2; the host's
        attention layout [B, N, C]: 1)."""
        if window_frames is not None and window_frames < 1:
            raise ValueError("window_frames must be at least 1 (or None for an unbounded cache)")
        self.sink_frames, self.window_frames, self.token_dim = sink_frames, window_frames, token_dim
        self.reset()

    @property
    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held keys and values per layer (views into the buffers)."""
        if not self.tokens:
            return []
        return [(self._held(k), self._held(v)) for k, v in zip(self._keys, self._values, strict=True)]

    def context(self, layer: int):
        if not self.tokens:
            return None
        k, v = self._held(self._keys[layer]), self._held(self._values[layer])
        positions = torch.arange(self.frames, device=k.device).repeat_interleave(self.tokens_per_frame)
        if self.positions is not None:  # the stored positions with the frame slot in column 0
            positions = torch.cat([positions.to(self.positions.dtype).expand(self.positions.shape[0], -1)[..., None],
                                   self.positions[..., 1:]], dim=-1)
        return k, v, positions

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values to attend over: the held frames', then this chunk's `k`, `v`
        (tokens along `token_dim`), as views into the layer's buffers. k and v are written right
        after the held frames; the next call overwrites them unless `append` keeps them first."""
        keys, values = self._write(self._keys, layer, k), self._write(self._values, layer, v)
        end = self.tokens + k.shape[self.token_dim]
        return keys.narrow(self.token_dim, 0, end), values.narrow(self.token_dim, 0, end)

    def append(self, kv_per_layer: list[tuple[torch.Tensor, torch.Tensor]], frames: int, positions: torch.Tensor | None = None):
        """Add one chunk's keys and values (frames * tokens along `token_dim`, per layer), then
        evict the oldest non-sink frames beyond the window. `positions` [B, frames * tokens, P]:
        per-token positions kept beside them (column 0, the frame, is renumbered by `context`).
        Keys and values that `attend` already wrote into place are not copied again."""
        if self.tokens and len(kv_per_layer) != len(self._keys):
            raise ValueError(f"the cache holds {len(self._keys)} layers; this chunk has {len(kv_per_layer)}")
        tokens = kv_per_layer[0][0].shape[self.token_dim]
        self.tokens_per_frame = tokens // frames
        for layer, (k, v) in enumerate(kv_per_layer):
            self._write(self._keys, layer, k)
            self._write(self._values, layer, v)
        if positions is not None:
            self.positions = positions if self.positions is None else torch.cat([self.positions, positions], dim=1)
        self.tokens += tokens
        self.frames += frames
        self.frames_seen += frames
        if self.window_frames is not None and self.frames > self.sink_frames + self.window_frames:
            self._evict(self.frames - self.sink_frames - self.window_frames)

    def move_origin(self, offset: torch.Tensor):
        """Measure the stored positions from a new origin: subtract offset [B, P - 1] from their
        columns after the frame (keeps the numbers small however far the camera travels; rotary
        scores depend on differences only)."""
        if self.positions is not None:
            self.positions = torch.cat([self.positions[..., :1], self.positions[..., 1:] - offset[:, None]], dim=-1)

    def nbytes(self) -> int:
        """Bytes of the held keys and values."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of the buffers (held frames plus the room kept for the next chunk)."""
        return sum(b.numel() * b.element_size() for b in self._keys + self._values)

    def reset(self, keep_buffers: bool = False):
        """Forget every frame. `keep_buffers`: keep the allocated buffers for the next video (their
        addresses stay the same, which CUDA graphs captured over them need)."""
        if not keep_buffers or not hasattr(self, "_keys"):
            self._keys: list[torch.Tensor] = []  # per layer: the buffer, tokens along token_dim
            self._values: list[torch.Tensor] = []
            self.reserved_tokens = self.reserved_tokens_per_frame = 0  # what `reserve` asked for
        self.tokens = 0  # tokens held per layer
        self.tokens_per_frame = 0
        self.frames = 0  # frames held now
        self.frames_seen = 0  # frames appended in total
        self.evicted = 0
        self.positions: torch.Tensor | None = None  # [B, N, P] per-token positions, for models that give them

    def reserve(self, frames: int, tokens_per_frame: int):
        """Room for `frames` frames (the whole video, or more than the window ever holds) in every
        buffer from its first allocation on: no regrowth and no copy while the video runs, and the
        buffers keep their addresses (what CUDA graphs captured over them need)."""
        self.reserved_tokens, self.reserved_tokens_per_frame = frames * tokens_per_frame, tokens_per_frame

    def slots(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the `tokens` slots right after the held frames of a layer: where `attend`
        wrote the last chunk's keys and values."""
        return (self._keys[layer].narrow(self.token_dim, self.tokens, tokens),
                self._values[layer].narrow(self.token_dim, self.tokens, tokens))

    def layout(self) -> tuple:
        """What a forward over the cache reads besides the values: the held length and the
        buffers' addresses (a CUDA graph captured over them is valid while this is unchanged)."""
        return (self.tokens, tuple(b.data_ptr() for b in self._keys + self._values))

    def _held(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer.narrow(self.token_dim, 0, self.tokens)

    def _write(self, buffers: list[torch.Tensor], layer: int, t: torch.Tensor) -> torch.Tensor:
        """Put t into the slots right after the held tokens of buffers[layer] (unless it is that
        very view already); returns the buffer."""
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("KVCache keeps no autograd history: run cached forwards under torch.no_grad()")
        size = t.shape[self.token_dim]
        buffer = self._buffer(buffers, layer, t, self.tokens + size)
        slot = buffer.narrow(self.token_dim, self.tokens, size)
        if not _same_view(slot, t):
            slot.copy_(t)
        return buffer

    def _buffer(self, buffers: list[torch.Tensor], layer: int, like: torch.Tensor, needed: int) -> torch.Tensor:
        """buffers[layer], grown (held tokens kept) when it has fewer than `needed` token slots or
        does not match `like` (a new layer, dtype, device or shape)."""
        if layer > len(buffers):
            raise ValueError(f"layer {layer} written before layer {len(buffers)}")
        buffer = buffers[layer] if layer < len(buffers) else None
        dim = self.token_dim
        if (buffer is not None and buffer.shape[dim] >= needed and buffer.dtype == like.dtype and buffer.device == like.device
                and buffer.shape[:dim] + buffer.shape[dim + 1:] == like.shape[:dim] + like.shape[dim + 1:]):
            return buffer
        shape = list(like.shape)
        shape[dim] = self._capacity(needed, 0 if buffer is None else buffer.shape[dim])
        grown = like.new_empty(shape)
        if buffer is not None and self.tokens:
            self._held(grown).copy_(self._held(buffer))
        if buffer is None:
            buffers.append(grown)
        else:
            buffers[layer] = grown
        return grown

    def _capacity(self, needed: int, current: int) -> int:
        """Token slots for a buffer that must hold `needed`: double what it had (fewer regrowths
        while the window fills) or what `reserve` asked for, but never more than sink + window + the
        chunk being written."""
        doubled = max(needed, 2 * current, self.reserved_tokens)
        tokens_per_frame = self.tokens_per_frame or self.reserved_tokens_per_frame
        if self.window_frames is None or not tokens_per_frame:
            return doubled
        bound = (self.sink_frames + self.window_frames) * tokens_per_frame + needed - self.tokens
        return max(needed, min(doubled, bound))

    def _evict(self, drop: int):
        """Forget `drop` frames after the sink: the window's frames move down over them."""
        start, stop = self.sink_frames * self.tokens_per_frame, (self.sink_frames + drop) * self.tokens_per_frame
        for buffer in self._keys + self._values:
            _move_down(buffer, self.token_dim, stop, self.tokens, start)
        if self.positions is not None:
            self.positions = torch.cat([self.positions[:, :start], self.positions[:, stop:]], dim=1)
        self.tokens -= stop - start
        self.frames -= drop
        self.evicted += drop


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _move_down(buffer: torch.Tensor, dim: int, source: int, end: int, target: int):
    """buffer[source:end] to buffer[target:...] along dim (target < source), in pieces no longer
    than source - target so that no piece overlaps its destination (copy_ refuses overlaps, and
    a clone of the whole window would move it twice)."""
    gap = source - target
    for offset in range(0, end - source, gap):
        size = min(gap, end - source - offset)
        buffer.narrow(dim, target + offset, size).copy_(buffer.narrow(dim, source + offset, size))


MAX_CHUNK_FRAMES = 64  # frames a world model generates at once (the shipped ones: 4)


def recipe_chunk_frames(recipe, source: str, default: int = 4) -> int:
    """The chunk length a world model's recipe names (`extra.chunk_frames`), checked: it comes
    from the file, and the session renders and holds that many frames at once."""
    value = (recipe.extra if recipe is not None else {}).get("chunk_frames", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHUNK_FRAMES:
        raise ValueError(f"{source}: its recipe's chunk_frames {value!r:.40} is not a frame count in 1..{MAX_CHUNK_FRAMES}")
    return value


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
        distilled student's sigmas, or its timesteps under its shift, converted as the host converts
        them), else `steps` evenly spaced under its shift. A `steps` other than the recipe's asks for
        evenly spaced levels instead."""
        if recipe is None:
            return cls.few_step(steps or 4)
        shift = recipe.shift or 1.0
        if steps and steps != recipe.steps or not (recipe.sigmas or recipe.timesteps):
            return cls.few_step(steps or recipe.steps, shift=shift)
        if recipe.sigmas:
            levels = [float(v) for v in recipe.sigmas]
        else:
            levels = [sampling.flow_timestep_to_sigma(t, shift) for t in recipe.timesteps]
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
