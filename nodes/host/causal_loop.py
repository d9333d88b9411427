"""One causal video on the host, chunk by chunk: the Causal Video Sampler's loop.

Each chunk is sampled by the host's own guider and sampler with the student's recipe (its wrappers,
patches and model management, as SamplerCustom runs them, one sampling run per chunk), then runs once
more at noise level 0 so that its keys and values join the KV cache (the context pass, `host.
wan_causal`). The GPU should never wait for the CPU between chunks, so what a chunk reads is put on
the device once per video (the latent, the sigmas and the prompt's tensors: the host would copy a CPU
prompt to the device at every step, and each such copy waits for the GPU) or queued ahead from pinned
memory (each chunk's noise), and the chunks' latents stay there until the video is done. Each chunk is
decoded and its frames come over on a stream of their own, and the context pass runs on another, so
that the host's synchronising setup of the next chunk does not wait for it (`Beside`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import torch

from ...fastgen_core import sampling
from .conds import conditioning_on
from .devices import tensor_attributes_on
from .wan_causal import WanCausalRun, compute_dtype


@dataclass
class Chunk:
    index: int
    latents: torch.Tensor  # [B, C, F, H, W] on the device, in the latent space the host returns
    frames: torch.Tensor | None  # the chunk's decoded frames [B*F', H, W, 3] on the CPU, if a decoder was given
    seconds: float  # from the chunk's start until it was handed over (its frames out, if decoded)


@functools.cache
def _side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class Beside:
    """CUDA work queued on a stream of its own (one per `purpose`), after everything queued so far on
    the current stream: `with Beside(device, "frames", reads=(x,)) as beside: ...`; then `beside.done`
    is an event recorded after it. Elsewhere than CUDA the work runs inline and `done` is None.
    `reads`: tensors of the current stream's that the work reads (their memory is not handed out
    again before it has)."""

    def __init__(self, device: torch.device, purpose: str, reads: tuple = ()):
        self.device, self.purpose, self.reads = torch.device(device), purpose, reads
        self.done, self._context = None, None

    def __enter__(self):
        if self.device.type == "cuda":
            stream = _side_stream(self.device, self.purpose)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            for tensor in self.reads:
                tensor.record_stream(stream)
            self._context = torch.cuda.stream(stream)
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self.done = torch.cuda.Event()
            self.done.record()
            self._context.__exit__(*exc)
        return False


def decode_beside(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Decode a chunk and copy its frames to the host on a stream of their own, beside the work queued
    after this call (the context pass); returns a function that waits for those frames alone and gives
    the CPU tensor. The decoder's state between chunks lives on that stream too, in chunk order."""
    with Beside(latents.device, "frames", reads=(latents,)) as beside:
        host = decode(latents).to("cpu", non_blocking=latents.device.type == "cuda")  # into pinned memory
    if beside.done is None:
        return lambda: host
    return lambda: (beside.done.synchronize(), host)[1]


class FrameSink:
    """A video's frames gathered chunk by chunk into one tensor, as they arrive: no concatenation at the
    end (81 frames at 480p are 0.4 GB, whose copy would add tens of milliseconds after the last chunk).
    `capacity`: the frames the decoder will give in all, if known; more are taken too."""

    def __init__(self, capacity: int | None = None):
        self.capacity, self.video, self.count = capacity or 0, None, 0

    def add(self, frames: torch.Tensor):
        n = frames.shape[0]
        if self.video is None:
            self.video = torch.empty((max(self.capacity, n), *frames.shape[1:]), dtype=frames.dtype)
        elif self.count + n > self.video.shape[0]:
            grown = torch.empty((2 * (self.count + n), *frames.shape[1:]), dtype=frames.dtype)
            grown[:self.count] = self.video[:self.count]
            self.video = grown
        self.video[self.count:self.count + n] = frames
        self.count += n

    def result(self) -> torch.Tensor | None:
        return None if self.video is None else self.video[:self.count]


def context_pass(model, run: WanCausalRun, latents: torch.Tensor, inputs: dict, options: dict):
    """The finished chunk once more at noise level 0: its keys and values go into the cache.
    `options`: the transformer_options of this pass (see the node's `context_options`).

    On a GPU it is queued on a stream of its own: the host's setup of the next chunk synchronises
    the sampling stream (it reads the latent and the sigmas on the CPU), and would otherwise wait for
    this pass and leave the GPU idle for the rest of the setup. The next chunk's first forward waits
    for it on the GPU (`WanCausalRun.wait_for_context`)."""
    comfy.model_management.load_models_gpu([model])
    base = model.model
    device = comfy.model_management.get_torch_device()
    x = latents.to(device)
    with Beside(device, "context", reads=(x,)) as beside:
        run.begin_chunk(x.shape, device, compute_dtype(base), write=True)
        with torch.no_grad():
            base.apply_model(x, torch.zeros(x.shape[0], device=device), transformer_options=options, **inputs)
        run.end_chunk(x.shape[2])
    run.context_done = beside.done


def causal_chunks(causal, run: WanCausalRun, positive, latent: torch.Tensor, sampler, sigmas: torch.Tensor,
                  first_sigmas: torch.Tensor, chunk_frames: int, seed: int, context_inputs: dict, context_options: dict,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[Chunk]:
    """Generate the video chunk after chunk, yielding each when it is final.

    `causal`: the MODEL made causal over `run` (`make_causal`); `latent`: the whole video's
    [B, C, T, H, W] (usually empty). Chunk i starts from noise drawn in chunk order from a CPU
    generator seeded with `seed`, and is sampled with `first_sigmas` (i = 0) or `sigmas` and the
    sampler's seed `seed + i`. `decode(latents) -> frames` on the device: each chunk's frames are
    decoded and brought over beside its context pass. The last chunk gets no context pass (no
    chunk reads its keys).

    The first chunk is handed over as soon as its frames are out (its latency is what a user waits
    for); each later one once the chunk after it is queued, so that what the caller does with it
    (previews, copies) runs while the GPU works instead of between chunks.
    """
    device = comfy.model_management.get_torch_device()
    positive = conditioning_on(positive, device)
    guider = comfy.samplers.CFGGuider(causal)
    guider.set_conds(positive, positive)  # at cfg 1 the host never evaluates the negative
    guider.set_cfg(1.0)
    latent = latent.to(device)
    sigmas, first_sigmas = sigmas.to(device), first_sigmas.to(device)
    generator = torch.Generator().manual_seed(seed)
    total = latent.shape[2]
    chunks = math.ceil(total / chunk_frames)
    dtype = compute_dtype(causal.model)

    def handed_over(index, latents, frames, start) -> Chunk:
        return Chunk(index, latents, frames() if frames is not None else None, time.perf_counter() - start)

    waiting = None  # the previous chunk, handed over once this one is queued
    # the host's latent format copies its CPU mean and std at every chunk's end otherwise (a host sync)
    with tensor_attributes_on(causal.model.latent_format, device):
        for i in range(chunks):
            start = time.perf_counter()
            span = slice(i * chunk_frames, min(total, (i + 1) * chunk_frames))
            # drawn in chunk order: a video's first chunks do not depend on how long it is
            noise = sampling.cpu_noise(latent[:, :, span].shape, generator, torch.float32, device)
            run.begin_chunk(noise.shape, device, dtype)
            latents = guider.sample(noise, latent[:, :, span], sampler, first_sigmas if i == 0 else sigmas,
                                    disable_pbar=True, seed=seed + i)
            frames = decode_beside(decode, latents) if decode is not None else None
            if i + 1 < chunks:
                context_pass(causal, run, latents, context_inputs, context_options)
            if waiting is not None:
                yield handed_over(*waiting)
                waiting = None
            if i == 0:
                yield handed_over(i, latents, frames, start)
            else:
                waiting = (i, latents, frames, start)
        if waiting is not None:
            yield handed_over(*waiting)
    run.wait_for_context()  # whatever the caller queues next sees the cache complete
