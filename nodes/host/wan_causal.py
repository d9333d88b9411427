"""The host's Wan 2.1 made block-causal, with a KV cache, without a copy of its model code.

Two host mechanisms do it (comfy/ldm/wan/model.py, v0.3.64):
- a block replacement on every transformer block (`patches_replace["dit"][("double_block", i)]`)
  notes which block runs and hands it the rotary embedding of the chunk's own frames (`rope_encode`
  with `t_start` = frames generated before it), and
- the attention override (`transformer_options["optimized_attention_override"]`) takes each block's
  first attention call, its self-attention, and puts the cached keys and values of the earlier
  frames in front of the chunk's own (or, for a whole sequence at once, adds the block-causal mask).
  Cross-attention calls pass through untouched.

Keys are cached after RoPE, at their absolute frame positions, as Self-Forcing caches them. A
causally trained Wan 2.1 checkpoint (Self-Forcing, CausVid) is an ordinary Wan state dict: load it
with the stock Load Diffusion Model node.

With `WanCausalRun(..., compile=True)` each block runs through `torch.compile` (inductor fuses its
RoPE, norms, modulation and gating; on CUDA the FFN's bias and GELU go into its first GEMM,
`fastgen_core.fx_passes`) while the attention override stays eager: it is
`torch.compiler.disable`d, so dynamo breaks the graph there and the KV cache stays plain Python. The
compiled function is a trampoline that is handed the host's own block call: dynamo guards on code and
shapes, not on which block, so one set of graphs serves every block and every cache length (the cache
never enters a graph), and the host's model objects are not touched (no `block.compile()`).

With `WanCausalRun(..., graphs=ForwardGraphs())` the whole stack of blocks is replayed as one CUDA
graph per cache length (`fastgen_core.graphs`): the first block's patch runs all of them, the others
pass its result on. The graph's inputs are the blocks' (tokens, text context, time modulation, the
chunk's rotary embedding) and its key is the cache's layout (held length and buffer addresses), so
a chunk's denoising steps and its context pass share one graph; after a replayed context pass the
chunk's keys and values are already in the cache's slots, where `end_chunk` finds them. The
embeddings and the head stay eager. Only the text-to-video WanModel is graphed (its blocks take no
image context); other Wan variants run their blocks eagerly.

A wrapper around the diffusion model's forward (`causal_forward`) keeps the CPU from waiting for the
GPU at every step: the host's timestep embedding copies a CPU `arange` to the GPU, a blocking copy
that drains the stream; during a causal forward the host module's function is swapped for the same
arithmetic made on the device (`timestep_embedding_on_device`). The wrapper also makes the forward
wait, on the GPU, for the context pass queued on a stream of its own (`WanCausalRun.context_done`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import threading
from collections import Counter

import torch
from comfy.patcher_extension import WrappersMP

from ...fastgen_core.graphs import ForwardGraphs
from ...fastgen_core.world import KVCache

RUN_KEY = "fastgen_causal_run"
FUSE_LINEAR_GELU = True  # in the compiled blocks, the FFN's Linear + tanh-GELU as one GEMM (CUDA only)
log = logging.getLogger("fastgen")


ASYNC_ALLOCATOR_NOTE = (
    "ComfyUI runs PyTorch's cudaMallocAsync allocator here (its default on recent GPUs): under it a CUDA graph cannot "
    "hold torch.compile's kernels (memory allocated during a capture is not addressable by them), so the graphs replay "
    "the eager blocks. For compiled blocks inside the graphs, start ComfyUI with --disable-cuda-malloc (README, Causal "
    "video).")


def graphs_need_eager_blocks(compile: bool, graphs: bool) -> bool:
    """True when compiled blocks cannot be captured in CUDA graphs in this process: PyTorch's
    cudaMallocAsync allocator hands a capture memory that Triton's kernels refuse ("Pointer argument
    cannot be accessed"). Compiled blocks alone, or graphs of eager blocks, work under it."""
    return (bool(compile) and graphs and torch.cuda.is_available()
            and torch.cuda.get_allocator_backend() == "cudaMallocAsync")


def compute_dtype(base_model) -> torch.dtype:
    """The dtype the host computes a model in: its weights' dtype, unless it casts them (fp8 weights
    run in fp16 / bf16; RoPE tables and activations must not be made in fp8)."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


class WanCausalRun:
    """One rollout's state on a Wan model: the cache, the chunk being run and which pass it is.

    It travels in `transformer_options`, which the host deep-copies with every `clone()`: the run is
    shared state, not data, so a copy is the same object.
    """

    def __init__(self, diffusion_model, cache: KVCache, compile: bool | str = False, graphs: ForwardGraphs | None = None):
        """`compile`: run the blocks through torch.compile (True, or a torch.compile mode such as
        "reduce-overhead"; off for good, with a warning, if
        compiling fails: the eager blocks give the same result). `graphs`: replay whole forwards
        as CUDA graphs (see the module's docstring; not with "reduce-overhead", which graphs the
        compiled pieces itself)."""
        if cache.token_dim != 1:
            raise ValueError("the host's attention takes [B, N, C]: make the cache with KVCache(token_dim=1)")
        if graphs is not None and compile == "reduce-overhead":
            raise ValueError("whole-forward CUDA graphs and torch.compile's reduce-overhead mode exclude each other")
        self.diffusion_model, self.cache, self.compile, self.graphs = diffusion_model, cache, compile, graphs
        self.freqs = None  # rotary embedding of the current chunk
        self.write = False  # the context pass: keep this chunk's keys and values for the cache
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask = None  # block-causal mask for a whole-sequence forward (the reference path)
        self.layer, self.attention_calls = None, 0
        self.blocks_done = False  # the graphed stack ran every block: the later patches pass its output on
        self.context_done = None  # CUDA event of the last context pass, queued on a stream of its own
        if graphs is not None and (type(diffusion_model).__name__ != "WanModel"
                                   or getattr(diffusion_model, "img_emb", None) is not None):
            kind = type(diffusion_model).__name__ + (" with image inputs" if getattr(diffusion_model, "img_emb", None) is not None else "")
            graphs.failure = f"CUDA graphs of the blocks are made for the text-to-video WanModel, not {kind}"

    def __deepcopy__(self, memo):
        return self

    def reserve(self, latent_shape):
        """Room in the cache for a whole video latent [B, C, T, H, W] (bounded by its window): its
        buffers are allocated once, so a cache length keeps one CUDA graph."""
        _, _, frames, h, w = latent_shape
        pt, ph, pw = self.diffusion_model.patch_size
        self.cache.reserve(math.ceil(frames / pt), math.ceil(h / ph) * math.ceil(w / pw))

    def begin_chunk(self, latent_shape, device, dtype, write: bool = False, first_frame: int | None = None):
        """Before a forward over one chunk of latent frames [B, C, F, H, W]."""
        _, _, frames, h, w = latent_shape
        start = self.cache.frames_seen if first_frame is None else first_frame
        self.freqs = self.diffusion_model.rope_encode(frames, h, w, t_start=start, device=device, dtype=dtype)
        self.write, self.pending, self.mask, self.blocks_done = write, {}, None, False

    def begin_sequence(self, latent_shape, chunk_frames: int):
        """Before a forward over a whole sequence of chunks at once, under the block-causal mask."""
        _, _, frames, h, w = latent_shape
        pt, ph, pw = self.diffusion_model.patch_size
        tokens = (h // ph) * (w // pw)
        chunk = (torch.arange(frames // pt) // (chunk_frames // pt)).repeat_interleave(tokens)
        allowed = chunk[None, :] <= chunk[:, None]
        # additive, not boolean: every attention back end of the host adds a float mask the same way
        self.mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
        self.freqs, self.write = None, False

    def wait_for_context(self):
        """The current stream waits, on the GPU, for the last context pass (its keys and values, and
        the graphs' buffers, are what the next forward reads); the CPU goes on."""
        if self.context_done is not None:
            self.context_done.wait()
            self.context_done = None

    def end_chunk(self, frames: int):
        """After the context pass: the chunk's keys and values join the cache."""
        if self.write:
            layers = len(self.diffusion_model.blocks)
            if sorted(self.pending) != list(range(layers)):
                raise RuntimeError(f"the context pass saw blocks {sorted(self.pending)} of {layers}: a patch skipped blocks")
            self.cache.append([self.pending[i] for i in range(layers)], frames)
        self.write, self.pending = False, {}


def _run(options) -> WanCausalRun | None:
    return (options or {}).get(RUN_KEY)


def _block_patch(index: int):
    def patch(args, extra):
        run = _run(args.get("transformer_options"))
        if run is None:
            return extra["original_block"](args)
        if index == 0:
            run.blocks_done = False
        elif run.blocks_done:  # block 0's patch ran the whole graphed stack
            run.blocks_done = index < len(run.diffusion_model.blocks) - 1
            return {"img": args["img"]}
        if run.freqs is not None:
            args = {**args, "pe": run.freqs.to(args["pe"])}
        if index == 0 and run.graphs is not None and run.graphs.enabled and run.freqs is not None and run.mask is None:
            out = _graphed_blocks(run, args)
            run.blocks_done = len(run.diffusion_model.blocks) > 1
            return {"img": out}
        run.layer, run.attention_calls = index, 0
        try:
            return _run_block(run, extra["original_block"], args)
        finally:
            run.layer = None

    return patch


def _host_block(block):
    """What the host's forward_orig hands a block patch as "original_block" for this block (its
    `block_wrap`, text-to-video: no image context)."""
    def block_wrap(args):
        return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"], context_img_len=None,
                             transformer_options=args["transformer_options"])}

    return block_wrap


def _graphed_blocks(run: WanCausalRun, args) -> torch.Tensor:
    """Every block over args' tokens through the run's CUDA graphs (eager on a key's first call)."""
    options, blocks = args["transformer_options"], run.diffusion_model.blocks

    def stack(inputs):
        x = inputs["img"]
        try:
            for j, block in enumerate(blocks):
                run.layer, run.attention_calls = j, 0
                x = _run_block(run, _host_block(block), {**inputs, "img": x, "transformer_options": options})["img"]
        finally:
            run.layer = None
        return x

    key = (run.cache.layout(), bool(run.compile))
    out = run.graphs(key, stack, {name: args[name] for name in ("img", "txt", "vec", "pe")})
    if run.write and len(run.pending) < len(blocks):  # replayed: no Python ran; the keys are in the cache's slots
        run.pending = {i: run.cache.slots(i, args["img"].shape[1]) for i in range(len(blocks))}
    return out


def _run_block(run: WanCausalRun, original_block, args):
    if not run.compile:
        return original_block(args)
    try:
        mode = run.compile if isinstance(run.compile, str) else None
        out = _compiled_block(mode)(original_block, args)
        if mode == "reduce-overhead":  # the next block replays the same CUDA graphs over this output
            out = {**out, "img": out["img"].clone()}
        return out
    except Exception as err:  # noqa: BLE001 - any compiler failure: the eager block is exact (a real error recurs there)
        # the traceback too: a compiler failure on a user's machine is only diagnosable with it
        log.warning("FastGen causal loop: torch.compile of the Wan blocks failed (%s); running them eagerly",
                    str(err).splitlines()[0][:200] if str(err) else type(err).__name__, exc_info=True)
        run.compile = False
        run.attention_calls = 0  # the failed attempt may have got past the self-attention already
        return original_block(args)


def _call_block(original_block, args):
    """The host's own block call (its `block_wrap`): dynamo traces through it to the block's forward."""
    return original_block(args)


@functools.cache
def _compiled_block(mode: str | None = None):
    """One compiled `_call_block` per torch.compile mode for the process, made on first use
    (torch.compile's imports are slow). The 30 blocks share its graphs; a new latent size compiles
    once more. `mode` "reduce-overhead" also replays the compiled pieces as CUDA graphs. The default
    mode also fuses each FFN's Linear + GELU (`linear_gelu_pass`; torch.compile takes options or a
    mode, not both)."""
    if mode is None and FUSE_LINEAR_GELU:
        return torch.compile(_call_block, options={"pre_grad_custom_pass": linear_gelu_pass()})
    return torch.compile(_call_block, mode=mode)


@functools.cache
def linear_gelu_pass():
    """The process's FuseLinearGelu pass (imported on first use: torch._inductor takes ~1.5 s to import)."""
    from ...fastgen_core.fx_passes import FuseLinearGelu

    return FuseLinearGelu()


@torch.compiler.disable  # eager inside a compiled block: the cache is Python state, not graph input
def causal_attention(func, q, k, v, *args, **kwargs):
    """The attention override: self-attention of a Wan block sees [cache, chunk] (or the mask)."""
    run = _run(kwargs.get("transformer_options"))
    if run is None or run.layer is None:
        return func(q, k, v, *args, **kwargs)
    run.attention_calls += 1
    if run.attention_calls != 1:  # the block's cross-attention (text, image)
        return func(q, k, v, *args, **kwargs)
    if run.mask is not None:
        return func(q, k, v, *args, **{**kwargs, "mask": run.mask.to(q)})
    keys, values = run.cache.attend(run.layer, k, v)  # views of the cache's buffer: no concatenation
    if run.write:  # this chunk's slots, where end_chunk's append finds them already in place
        tokens = k.shape[1]
        run.pending[run.layer] = (keys[:, -tokens:], values[:, -tokens:])
    return func(q, keys, values, *args, **kwargs)


def timestep_embedding_on_device(dim: int, position: torch.Tensor) -> torch.Tensor:
    """comfy.ldm.wan.model.sinusoidal_embedding_1d with its frequencies made on the position's device
    (the host makes them on the CPU and copies them over: a blocking copy, which makes the CPU wait
    for the GPU at every forward). The same operations on the same values: the same result."""
    half = dim // 2
    position = position.type(torch.float32)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half, device=position.device).to(position).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


_swap_lock = threading.Lock()
_swap_users: Counter = Counter()  # host module -> forwards running with the swapped embedding
_host_embeddings: dict = {}  # host module -> its own sinusoidal_embedding_1d while swapped


@contextlib.contextmanager
def device_timestep_embedding(module):
    """While inside, `module.sinusoidal_embedding_1d` (the host's Wan model module) is
    `timestep_embedding_on_device`. Counted, so overlapping forwards (another thread's) restore the
    host's function only when the last one leaves."""
    if not callable(getattr(module, "sinusoidal_embedding_1d", None)):
        yield
        return
    with _swap_lock:
        if _swap_users[module] == 0:
            _host_embeddings[module] = module.sinusoidal_embedding_1d
            module.sinusoidal_embedding_1d = timestep_embedding_on_device
        _swap_users[module] += 1
    try:
        yield
    finally:
        with _swap_lock:
            _swap_users[module] -= 1
            if _swap_users[module] == 0:
                module.sinusoidal_embedding_1d = _host_embeddings.pop(module)


def causal_forward(executor, *args, **kwargs):
    """The DIFFUSION_MODEL wrapper of a causal run: its forward waits (on the GPU) for the last
    context pass and computes the timestep embedding without a host sync."""
    options = args[5] if len(args) > 5 else kwargs.get("transformer_options")
    run = _run(options)
    if run is None:
        return executor(*args, **kwargs)
    run.wait_for_context()
    with device_timestep_embedding(inspect.getmodule(type(run.diffusion_model))):
        return executor(*args, **kwargs)


def make_causal(model, run: WanCausalRun):
    """A clone of a Wan MODEL whose forwards go through `run` (block patches + attention override)."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not hasattr(diffusion_model, "rope_encode") or not hasattr(diffusion_model, "blocks"):
        raise ValueError(f"the causal loop runs Wan 2.1-style models; this is {type(diffusion_model).__name__}")
    causal = model.clone()
    for i in range(len(diffusion_model.blocks)):
        causal.set_model_patch_replace(_block_patch(i), "dit", "double_block", i)
    options = causal.model_options.setdefault("transformer_options", {})
    if "optimized_attention_override" in options:
        raise ValueError("this MODEL already has an attention override (another patch); the causal loop needs its own")
    options["optimized_attention_override"] = causal_attention
    options[RUN_KEY] = run
    causal.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, RUN_KEY, causal_forward)
    return causal
