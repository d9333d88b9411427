"""Cache patch: skip redundant work across steps, blocks and static regions.

The policies live in fastgen_core.cache; here they are attached the way the host's EasyCache is,
through wrappers on a MODEL clone, so they compose with LoRA, weight patches and torch.compile:

- OUTER_SAMPLE: a fresh `CacheRun` per sampling run (state never leaks between runs), held by a
  `CacheHolder` in a clone of the guider's model options, and the run's summary logged at the end;
- DIFFUSION_MODEL: the step decision (skip the call, or run it), per stream — the tuple of
  conditionings batched in the call — so cond and uncond never share cached tensors; it never
  writes into its input (the sampler's latent);
- block replacement (`set_model_patch_replace`, "dit" double/single blocks) for the block and
  chunk policies, through the adapters in nodes/host/cache_blocks.py.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..fastgen_core import cache
from .host import inputs
from .host.cache_blocks import adapter_for

SETTINGS_KEY = "fastgen_cache"  # transformer_options: the CacheConfig
RUN_KEY = "fastgen_cache_run"  # transformer_options during a run: its CacheHolder
PROFILE_OPTION = "fastgen_cache_profiles"  # model_options: calibrated ChangeProfiles, newest last
WRAPPER_KEY = "fastgen_cache"
WrappersMP = comfy.patcher_extension.WrappersMP
log = logging.getLogger("FastGen")
LAST_STATS: dict = {}  # the last run's statistics (read by tests and the benchmark)


def _transformer_options(args, kwargs) -> dict:
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for value in reversed(args):
        if isinstance(value, dict):
            return value
    return {}


def _sync():
    device = comfy.model_management.get_torch_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stream_key(options: dict, x: torch.Tensor):
    uuids = options.get("uuids") or [None]
    groups = len(uuids) if x.shape[0] % len(uuids) == 0 else 1
    return (tuple(str(u) for u in uuids), tuple(x.shape), x.dtype), groups


# ----------------------------------------------------------------------------- wrappers


class CacheHolder:
    """One sampling run on the host: the core's CacheRun, and what the wrappers and the block
    patches hand each other during a model call."""

    def __init__(self, run: cache.CacheRun):
        self.run = run
        self.adapter = None  # the block adapter (block and chunk policies), found at the first model call
        self.current: cache.BlockCacheState | None = None  # the stream the block patches serve, during a call
        self.capture: dict | None = None  # U-Net full calls: receives the deep feature from the output-block patch


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    run = cache.CacheRun(options[SETTINGS_KEY], args[3], guider.model_options.get(PROFILE_OPTION))
    options[RUN_KEY] = CacheHolder(run)
    _announce(run)
    try:
        return executor(*args, **kwargs)
    finally:
        if run.enabled:
            log.info(run.stats.summary())
        LAST_STATS.clear()
        LAST_STATS.update(run.stats.as_dict(), enabled=run.enabled, policy=run.config.policy)
        guider.model_options = original


def _announce(run: cache.CacheRun):
    config = run.config
    if not run.enabled:
        unmatched = f" ({run.unmatched_profiles} calibrated profile(s) are for other schedules)" if run.unmatched_profiles else ""
        log.warning(f"FastGen Cache: {run.reason}{unmatched}.")
        return
    source = "calibrated profile" if run.profile is not None else "online error estimate"
    log.info(f"FastGen Cache: policy {config.policy}, threshold {config.threshold:g}, steps {run.steps}, "
             f"window {config.start:g}-{config.end:g}, {source}")


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = _transformer_options(args, kwargs)
    holder = options.get(RUN_KEY)
    sigmas = options.get("sigmas")
    if holder is None or not holder.run.enabled or sigmas is None:
        return executor(*args, **kwargs)
    run = holder.run
    x = args[0]
    sigma = float(sigmas.reshape(-1)[0])
    step, steps = run.step_of(sigma)
    key, groups = _stream_key(options, x)
    step_policy = run.config.policy == "step"
    if not step_policy and holder.adapter is None:
        holder.adapter = adapter_for(executor.class_obj)
    deep = holder.adapter is not None and holder.adapter.deep_cache
    state = run.stream(key, groups, deep)
    with cache.Timer(_sync) as timer:
        if step_policy:
            out = state.run(x, sigma, step, steps, lambda: executor(*args, **kwargs))
            full = state.mode is cache.Mode.COMPUTE
        elif deep:
            out, full = _run_unet(holder, state, executor, args, kwargs, x, step, steps, sigma)
        else:
            out, full = _run_blocks(holder, state, executor, args, kwargs, x, step, steps, sigma)
    run.stats.add_call(timer.seconds, full)
    return out


def _run_unet(holder, state, executor, args, kwargs, x, step, steps, sigma):
    """DeepCache-like: (output, computed everything?). UNetModel._forward's arguments are
    (x, timesteps, context, y, control, transformer_options)."""
    adapter = holder.adapter
    names = ("x", "timesteps", "context", "y", "control", "transformer_options")
    call = dict(zip(names, args, strict=False)) | {k: kwargs[k] for k in names if k in kwargs}
    if call.get("control") is not None:  # ControlNet residuals enter every block: no shortcut
        return executor(*args, **kwargs), True
    extra = {k: v for k, v in kwargs.items() if k not in names}
    options = call["transformer_options"]
    shallow, emb = adapter.shallow(x, call["timesteps"], call.get("context"), call.get("y"), options, extra)
    if state.decide(shallow, step, steps) is cache.Mode.SKIP:
        deep = state.deep.predict(sigma).to(shallow.dtype)
        state.skipped(adapter.block_count(), 2)
        return adapter.finish(x, shallow, deep, emb, call.get("context"), options, extra), False
    holder.capture = {}
    try:
        out = executor(*args, **kwargs)
        deep = holder.capture.get("deep")
    finally:
        holder.capture = None
    if deep is not None:
        state.computed(sigma, shallow, deep, adapter.block_count())
    return out, True


def deep_feature_patch(h, hsp, transformer_options):
    """Output-block patch: keeps the feature entering the U-Net's last output block (full calls)."""
    holder = transformer_options.get(RUN_KEY)
    capture = None if holder is None else holder.capture
    if capture is not None and transformer_options.get("block") == ("output", holder.adapter.last_output_block()):
        capture["deep"] = h.detach().clone()
    return h, hsp


def _run_blocks(holder, state, executor, args, kwargs, x, step, steps, sigma):
    adapter = holder.adapter
    timestep = args[1] if len(args) > 1 and torch.is_tensor(args[1]) else None
    grid = adapter.grid(x, timestep, kwargs) if holder.run.config.policy == "chunk" and adapter.supports_chunks else None
    state.begin(step, steps, sigma, grid)
    state.set_depth(len(adapter.chain()))
    holder.current = state
    try:
        out = executor(*args, **kwargs)
    finally:
        holder.current = None
    return out, state.mode is cache.Mode.COMPUTE


def block_patch(position: str):
    """A block replacement for the first, a middle or the last block of the chain."""

    def patch(args, extra):
        original = extra["original_block"]
        holder = args.get("transformer_options", {}).get(RUN_KEY)
        state = None if holder is None else holder.current
        if state is None:
            return original(args)
        adapter = holder.adapter
        if position == "first":
            out = original(args)
            state.first(args["img"], out["img"], adapter.base(out))
            return out

        def run_tokens(tokens, index):
            return original(adapter.gathered(args, tokens, index))["img"]

        if position == "last":
            return {"img": state.last(args["img"], run_tokens)}
        if state.mode is cache.Mode.SKIP:
            return adapter.passthrough(args)
        if state.mode is cache.Mode.PARTIAL:
            return {"img": state.middle(args["img"], run_tokens)}
        return original(args)

    return patch


def apply_cache(model, config: cache.CacheConfig):
    """A clone of `model` with the cache attached (the node's work, callable from scripts)."""
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[SETTINGS_KEY] = config
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    if config.policy != "step":
        diffusion_model = m.get_model_object("diffusion_model")
        adapter = adapter_for(diffusion_model)
        if adapter is None:
            raise ValueError(f"FastGen Cache: the {config.policy} policy needs a block adapter (embedded DiT, Wan, Flux, "
                             f"SD-family UNet); "
                             f"{type(diffusion_model).__name__} has none yet. Use the step policy on this model.")
        if config.policy == "chunk" and not adapter.supports_chunks:
            raise ValueError(f"FastGen Cache: the chunk policy does not support {adapter.name} yet; use block or step.")
        if adapter.deep_cache:
            m.set_model_output_block_patch(deep_feature_patch)
            return m
        chain = adapter.chain()
        if len(chain) < 2:
            raise ValueError("FastGen Cache: the block policies need a model with at least two blocks")
        for position, (kind, index) in enumerate(chain):
            name = "first" if position == 0 else "last" if position == len(chain) - 1 else "middle"
            m.set_model_patch_replace(block_patch(name), "dit", kind, index)
    return m


# ----------------------------------------------------------------------------- calibration


def calibrate(model, sample):
    """Run `sample(model_clone)` once uncached and return the ChangeProfile it measured."""
    recorder = cache.ProfileRecorder()
    seen = {}

    def outer(executor, *args, **kwargs):
        seen["sigmas"] = args[3]
        return executor(*args, **kwargs)

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        options = _transformer_options(args, kwargs)
        if options.get("sigmas") is not None and "sigmas" in seen:
            sigma = float(options["sigmas"].reshape(-1)[0])
            step, _ = cache.step_index(sigma, seen["sigmas"])
            key, groups = _stream_key(options, args[0])
            recorder.record(key, step, groups, out, sigma)
        return out

    m = model.clone()
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "fastgen_calibrate", outer)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "fastgen_calibrate", record)
    sample(m)
    if "sigmas" not in seen:
        raise RuntimeError("FastGen Calibrate Cache: the sampler never ran the model")
    return recorder.profile(seen["sigmas"].tolist())


# ----------------------------------------------------------------------------- nodes


class FastGenCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenCache",
            display_name="FastGen Cache",
            category="FastGen/patch",
            description="Skip work that barely changes between denoising steps: whole steps, the blocks after the first, "
            "or the static chunks of the latent. Helps teachers sampled with many steps (>= 16); few-step students "
            "(<= 8 steps) stay uncached unless a FastGen Calibrate Cache profile for the schedule is attached. "
            "After each run the log says what was skipped and the measured speedup.",
            inputs=[
                io.Model.Input("model", tooltip="The model to cache (works after LoRA loaders and other patches)."),
                io.Combo.Input("policy", options=list(cache.POLICIES), default="step",
                               tooltip="; ".join(f"{k}: {v}" for k, v in cache.POLICIES.items())),
                io.Float.Input("threshold", default=0.1, min=0.0, max=5.0, step=0.01,
                               tooltip="How much estimated relative change may accumulate before the model runs again. "
                               "0 never skips (exact); higher is faster and less faithful. 0.05-0.2 suits most models."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps before which nothing is skipped (the first step never is)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps after which nothing is skipped (the last step never is)."),
                io.Int.Input("max_skips", default=4, min=1, max=16, optional=True,
                             tooltip="At most this many skips in a row (per chunk for the chunk policy)."),
                io.Int.Input("chunk_tokens", default=2, min=1, max=64, optional=True,
                             tooltip="chunk policy: chunk side in tokens (patches); smaller chunks isolate moving regions "
                             "better but see less context when recomputed alone."),
                io.Int.Input("chunk_frames", default=1, min=1, max=64, optional=True,
                             tooltip="chunk policy: chunk depth in latent frames (video models)."),
                io.Int.Input("chunk_context", default=1, min=0, max=8, optional=True,
                             tooltip="chunk policy: the chunks this many around a changed one run too, as attention "
                             "context (their cached output is kept). 0 runs only the changed chunks (fastest, least faithful)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the cache attached.")],
        )

    @classmethod
    def validate_inputs(cls, policy: str = "step", threshold: float = 0.1, start: float = 0.0, end: float = 1.0):
        problem = inputs.widget_problem(cls, policy=policy, threshold=threshold, start=start, end=end)
        if problem is None and start is not None and end is not None and start > end:
            problem = f"start ({start}) must not be after end ({end})"
        return problem or True

    @classmethod
    def execute(cls, model, policy: str, threshold: float, start: float, end: float, max_skips: int = 4,
                chunk_tokens: int = 2, chunk_frames: int = 1, chunk_context: int = 1) -> io.NodeOutput:
        config = cache.CacheConfig(policy=policy, threshold=threshold, start=start, end=end, max_skips=max_skips,
                                   chunk_tokens=chunk_tokens, chunk_frames=chunk_frames, chunk_context=chunk_context)
        return io.NodeOutput(apply_cache(model, config))


class FastGenCalibrateCache(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenCalibrateCache",
            display_name="FastGen Calibrate Cache",
            category="FastGen/patch",
            description="Runs the sampler once, uncached, with the settings of the KSampler it precedes, and attaches the "
            "measured per-step change profile to the model. FastGen Cache then decides from the profile (deterministic), "
            "and may cache few-step (<= 8) schedules. Use the same steps, scheduler and denoise as the sampler after it.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate (put FastGen Cache after this node)."),
                io.Conditioning.Input("positive", tooltip="A typical positive prompt."),
                io.Conditioning.Input("negative", tooltip="A typical negative prompt."),
                io.Latent.Input("latent_image", tooltip="A latent of the size you will sample."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the calibration run."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Same as the sampler's steps."),
                io.Float.Input("cfg", default=3.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Same as the sampler's cfg."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Same as the sampler's."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Same as the sampler's."),
            ],
            outputs=[io.Model.Output(tooltip="The model carrying the profile (for FastGen Cache)."),
                     io.String.Output(display_name="profile", tooltip="The measured relative output change per step.")],
        )

    @classmethod
    def validate_inputs(cls, cfg: float = 3.0, sampler_name: str = "euler", scheduler: str = "simple"):
        return inputs.widget_problem(cls, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler) or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed: int, steps: int, cfg: float, sampler_name: str,
                scheduler: str) -> io.NodeOutput:
        import nodes  # the host's KSampler function: the same sampling the graph's KSampler does

        profile = calibrate(model, lambda m: nodes.common_ksampler(m, seed, steps, cfg, sampler_name, scheduler,
                                                                    positive, negative, latent_image))
        out = model.clone()
        out.model_options[PROFILE_OPTION] = list(model.model_options.get(PROFILE_OPTION, [])) + [profile]
        text = profile.summary()
        log.info(f"FastGen Calibrate Cache: {text}")
        return io.NodeOutput(out, text, ui=ui.PreviewText(text))
