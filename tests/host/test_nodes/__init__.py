"""Test-only nodes the host tests load beside the pack (never shipped): what a real graph gets from
files we cannot have here, such as a text encoder's CONDITIONING for the tiny Wan / SD1.5 models."""

import os

import torch


def _compute_like_a_gpu(name: str):
    """Make the CPU host pick and compute in fp16 / bf16 as it does on a GPU (FASTGEN_TEST_COMPUTE_DTYPE).

    On the CPU, ComfyUI stores weights in half precision at most and computes in fp32 (manual cast),
    which hides dtype mismatches that fail on every GPU. Claiming half-precision support for the
    CPU makes `unet_dtype` choose it and `unet_manual_cast` return None: weights, model inputs and
    activations are then half precision, as on a GPU. Loaded with the test nodes, before any model."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    import comfy.model_management as mm

    mm.should_use_fp16 = lambda *args, **kwargs: dtype == torch.float16
    mm.should_use_bf16 = lambda *args, **kwargs: dtype == torch.bfloat16


if os.environ.get("FASTGEN_TEST_COMPUTE_DTYPE"):
    _compute_like_a_gpu(os.environ["FASTGEN_TEST_COMPUTE_DTYPE"])


class FastGenTestConditioning:
    """Random text-encoder-shaped CONDITIONING: [[tensor[1, tokens, width], {"pooled_output": None or [1, pooled]}]]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 4096, "min": 1, "max": 8192})},
                # SDXL / Flux need a pooled text embedding (1280 / 768 wide); 0 = none
                "optional": {"pooled": ("INT", {"default": 0, "min": 0, "max": 4096})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing"

    def make(self, seed, tokens, width, pooled=0):
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, width, generator=gen)
        pooled_output = torch.randn(1, pooled, generator=gen) if pooled else None
        return ([[context, {"pooled_output": pooled_output}]],)


def _pack_module(suffix):
    """A module of the pack as the host imported it (under its folder path)."""
    import sys

    matches = [m for name, m in list(sys.modules.items()) if name.endswith("comfyui-fastgen" + suffix)]
    if not matches:
        raise RuntimeError(f"the FastGen pack's {suffix} is not loaded")
    return matches[0]


class FastGenTestCausalExactness:
    """Runs the host's own Wan code twice on one random video latent: once as a whole sequence under
    the block-causal mask, once chunk by chunk through the KV cache (clean context chunks at t = 0,
    the last chunk noisy), and reports the largest difference per chunk."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",),
                             "chunk_frames": ("INT", {"default": 2, "min": 1, "max": 8}),
                             "chunks": ("INT", {"default": 3, "min": 2, "max": 8})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def run(self, model, positive, chunk_frames, chunks):
        import comfy.model_management

        wan_causal, world = _pack_module(".nodes.host.wan_causal"), _pack_module(".fastgen_core.world")
        comfy.model_management.load_models_gpu([model])
        device = comfy.model_management.get_torch_device()
        dm = model.get_model_object("diffusion_model")
        frames = chunk_frames * chunks
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, frames, 4, 4, generator=gen).to(device)
        context = positive[0][0].to(device)
        t = torch.zeros(1, frames, device=device)
        t[:, -chunk_frames:] = 600.0  # Wan timesteps: clean context, the last chunk at sigma 0.6

        def forward(run, x, t):
            causal = wan_causal.make_causal(model, run)
            with torch.no_grad():
                return dm(x, t, context, transformer_options=causal.model_options["transformer_options"])

        full_run = wan_causal.WanCausalRun(dm, world.KVCache(token_dim=1))
        full_run.begin_sequence(x.shape, chunk_frames)
        full = forward(full_run, x, t)
        run = wan_causal.WanCausalRun(dm, world.KVCache(token_dim=1))
        errors = []
        for i in range(chunks):
            part = slice(i * chunk_frames, (i + 1) * chunk_frames)
            last = i == chunks - 1
            run.begin_chunk(x[:, :, part].shape, device, x.dtype, write=not last)
            out = forward(run, x[:, :, part], t[:, part])
            run.end_chunk(chunk_frames)
            errors.append(float((out - full[:, :, part]).abs().max()))
        unmasked_run = wan_causal.WanCausalRun(dm, world.KVCache(token_dim=1))
        unmasked_run.begin_sequence(x.shape, frames)  # one chunk: every frame sees every other
        unmasked = forward(unmasked_run, x, t)
        leak = float((unmasked[:, :, :chunk_frames] - full[:, :, :chunk_frames]).abs().max())
        text = " ".join(f"{e:.3e}" for e in errors) + f" | unmasked {leak:.3e} | cache {run.cache.frames}"
        return {"ui": {"text": [text]}, "result": (text,)}


class FastGenTestContextPass:
    """The Causal Video Sampler's context pass on one random chunk: the APPLY_MODEL wrapper keys it
    gets, and how far the keys it writes into the cache are from those of the bare model's layers."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def run(self, model, positive):
        import comfy.model_management
        from comfy.patcher_extension import WrappersMP

        world_nodes, world = _pack_module(".nodes.host.causal_video"), _pack_module(".fastgen_core.world")
        wan_causal, distill_nodes = _pack_module(".nodes.host.wan_causal"), _pack_module(".nodes.host.conds")
        causal_loop = _pack_module(".nodes.host.causal_loop")
        comfy.model_management.load_models_gpu([model])
        device = comfy.model_management.get_torch_device()
        keys = sorted(world_nodes.context_options(model).get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {}))
        x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))

        def cached_keys(options):
            run = wan_causal.WanCausalRun(model.get_model_object("diffusion_model"), world.KVCache(token_dim=1))
            causal = wan_causal.make_causal(model, run)
            inputs = distill_nodes.model_conds(causal.model, positive, "positive", (16, 2, 4, 4), device)[0]
            causal_loop.context_pass(causal, run, x, inputs, (options or world_nodes.context_options)(causal))
            return torch.cat([k.flatten() for k, _ in run.cache.layers])

        through_pass = cached_keys(None)
        bare = cached_keys(lambda m: dict(m.model_options["transformer_options"]))
        text = f"wrappers {','.join(keys) or '-'} | difference {float((through_pass - bare).abs().max()):.3e}"
        return {"ui": {"text": [text]}, "result": (text,)}


class FastGenTestKeptGraphs:
    """The Causal Video Sampler's kept cache and graphs (cuda_graphs "kept"): which runs reuse them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def run(self, model):
        world_nodes = _pack_module(".nodes.host.causal_video")
        shape = (1, 16, 6, 4, 4)
        get = lambda mode="kept", m=model, shape=shape, chunk=2, compile=False: world_nodes.cache_and_graphs(  # noqa: E731
            mode, m, shape, chunk, 2, 0, compile)
        world_nodes._kept.clear()  # from a fresh process's state (an earlier test may have kept these settings)
        first = get()
        first[1].graphs["stand-in"] = None  # as if the first run had captured a graph (a CPU captures none)
        reuse = get()
        checked_at_first_reuse = reuse[1].check_next
        reuse[1].check_next = False
        later = get()
        first[1].graphs.clear()
        checks = {
            "same settings reuse": reuse[0] is first[0] and later[1] is first[1],
            "the first reuse checks the graphs, later ones trust them": checked_at_first_reuse and not later[1].check_next,
            "other chunk size": get(chunk=3)[0] is not first[0],
            "back to the first settings": get()[0] is not first[0],
        }
        second = get()
        patched = model.clone()
        patched.add_patches({"diffusion_model.blocks.0.ffn.0.weight": (torch.zeros(1),)}, 0.5)
        checks["patched weights"] = get(m=patched)[0] is not second[0]
        third = get()
        checks["compile on"] = get(compile=True)[0] is not third[0]
        get()
        checks["this run: fresh"] = get("this run")[0] is not get("this run")[0]
        checks["this run drops the kept"] = not world_nodes._kept
        get()
        checks["off drops the kept"] = get("off")[1] is None and not world_nodes._kept
        text = " ".join(f"{name}={'yes' if ok else 'no'}" for name, ok in checks.items())
        return {"ui": {"text": [text]}, "result": (text,)}


class FastGenTestSink:
    """An output that takes IMAGEs and does nothing with them: timing runs (benchmarks/gpu_host.py)
    measure the node before it, not the encoding of 81 frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def run(self, images):
        return {}


NODE_CLASS_MAPPINGS = {"FastGenTestConditioning": FastGenTestConditioning, "FastGenTestCausalExactness": FastGenTestCausalExactness,
                       "FastGenTestContextPass": FastGenTestContextPass, "FastGenTestKeptGraphs": FastGenTestKeptGraphs,
                       "FastGenTestSink": FastGenTestSink}
