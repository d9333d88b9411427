"""#6 in the real host: FastGen Cache on the embedded teacher and a tiny random Wan through the stock
KSampler, after the core LoRA loader, and FastGen Calibrate Cache for few-step schedules."""

import copy

import numpy as np
import pytest
import torch
from prompts import images, teacher_prompt
from test_students_nodes import run_latent

POLICIES = ["step", "block", "chunk"]


def cache_node(model_link, policy, threshold, **extra):
    return {"class_type": "FastGenCache",
            "inputs": {"model": model_link, "policy": policy, "threshold": threshold, "start": 0.0, "end": 1.0, **extra}}


def logged(comfy, run):
    """Run `run()` and return (its result, what the server logged meanwhile)."""
    before = len(comfy.log())
    result = run()
    return result, comfy.log()[before:]


def cached_teacher(object_info, policy, threshold, steps=12, lora=False, quantize=None, compile_backend=None):
    prompt, ids = teacher_prompt(object_info, seed=3, digits="37", batch_size=2, steps=steps)
    model = [ids["FastGenLoadModel"], 0]
    if compile_backend:
        prompt["98"] = {"class_type": "TorchCompileModel", "inputs": {"model": model, "backend": compile_backend}}
        model = ["98", 0]
    if quantize:
        prompt["99"] = {"class_type": "FastGenQuantizeModel",
                        "inputs": {"model": model, "format": quantize, "layers": "", "calibrate": False, "steps": 2}}
        model = ["99", 0]
    if lora:
        prompt["100"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": "digit_test_lora.safetensors", "strength_model": 1.0}}
        model = ["100", 0]
    if policy is not None:
        prompt["101"] = cache_node(model, policy, threshold)
        model = ["101", 0]
    prompt[ids["KSampler"]]["inputs"]["model"] = model
    return prompt


@pytest.fixture(scope="module")
def teacher_reference(comfy, object_info):
    return images(comfy, cached_teacher(object_info, None, 0.0))


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_on_the_embedded_teacher(comfy, object_info, teacher_reference, policy):
    exact = images(comfy, cached_teacher(object_info, policy, 0.0))
    np.testing.assert_array_equal(exact, teacher_reference)
    fast, log = logged(comfy, lambda: images(comfy, cached_teacher(object_info, policy, 0.5)))
    assert "FastGen Cache: skipped" in log and "measured speedup" in log
    summary = [line for line in log.splitlines() if "FastGen Cache: skipped" in line][-1]
    skipped = summary.split("skipped ")[1]
    assert not skipped.startswith("0/12 model calls;") and "0/72 blocks" not in skipped, summary
    assert np.isfinite(fast).all() and np.abs(fast - teacher_reference).mean() < 0.1


def wan_graph(model_nodes, model_link, steps=12, cfg=3.0):
    prompt = dict(model_nodes)
    prompt["c1"] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": 0, "tokens": 8, "width": 4096}}
    prompt["c2"] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": 4096}}
    prompt["l"] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}}
    prompt["s"] = {"class_type": "KSampler", "inputs": {
        "model": model_link, "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["c1", 0], "negative": ["c2", 0], "latent_image": ["l", 0], "denoise": 1.0}}
    prompt["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/cache"}}
    return prompt


WAN = {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}}}


@pytest.mark.parametrize("policy", POLICIES)
def test_each_policy_on_a_tiny_wan(comfy, policy):
    reference, _ = run_latent(comfy, wan_graph(WAN, ["m", 0]))
    exact, _ = run_latent(comfy, wan_graph({**WAN, "c": cache_node(["m", 0], policy, 0.0)}, ["c", 0]))
    torch.testing.assert_close(exact, reference, rtol=0, atol=0)
    (fast, _), log = logged(comfy, lambda: run_latent(comfy, wan_graph({**WAN, "c": cache_node(["m", 0], policy, 2.0)}, ["c", 0])))
    summary = [line for line in log.splitlines() if "FastGen Cache: skipped" in line][-1]
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference), summary
    assert "skipped 0/12 model calls;" not in summary or "0/24 blocks" not in summary


def test_cache_composes_with_the_core_lora_loader(comfy, object_info, teacher_reference):
    lora_only = images(comfy, cached_teacher(object_info, None, 0.0, lora=True))
    assert np.abs(lora_only - teacher_reference).mean() > 0.01  # the LoRA acts
    for policy in ("step", "block"):
        np.testing.assert_array_equal(images(comfy, cached_teacher(object_info, policy, 0.0, lora=True)), lora_only)
    cached = images(comfy, cached_teacher(object_info, "step", 0.5, lora=True))
    assert np.abs(cached - lora_only).mean() < np.abs(cached - teacher_reference).mean()  # still the LoRA's images


def test_cache_composes_with_the_quantize_node(comfy, object_info, teacher_reference):
    """Quantize (int8, fake-quant on a CPU) then Cache: nothing skipped gives the quantized model's
    images exactly; skipping still gives the quantized model's images, not the unquantized ones."""
    quantized = images(comfy, cached_teacher(object_info, None, 0.0, quantize="int8"))
    assert np.abs(quantized - teacher_reference).max() > 0  # the quantizers act
    for policy in ("step", "block"):
        np.testing.assert_array_equal(images(comfy, cached_teacher(object_info, policy, 0.0, quantize="int8")), quantized)
    fast, log = logged(comfy, lambda: images(comfy, cached_teacher(object_info, "step", 0.5, quantize="int8")))
    summary = [line for line in log.splitlines() if "FastGen Cache: skipped" in line][-1]
    assert not summary.split("skipped ")[1].startswith("0/12"), summary
    assert np.isfinite(fast).all() and np.abs(fast - quantized).mean() < 0.1


def test_cache_composes_with_torch_compile(comfy, object_info, teacher_reference):
    """The host's TorchCompileModel (inductor) then Cache: nothing skipped gives the compiled model's
    images exactly, skipping skips (the wrapper runs around the compiled model)."""
    compiled, log = logged(comfy, lambda: images(comfy, cached_teacher(object_info, None, 0.0, compile_backend="inductor")))
    assert np.abs(compiled - teacher_reference).max() < 0.02  # the same model, compiled
    for policy in ("step", "block"):
        np.testing.assert_array_equal(images(comfy, cached_teacher(object_info, policy, 0.0, compile_backend="inductor")),
                                      compiled)
    fast, log = logged(comfy, lambda: images(comfy, cached_teacher(object_info, "step", 0.5, compile_backend="inductor")))
    summary = [line for line in log.splitlines() if "FastGen Cache: skipped" in line][-1]
    assert not summary.split("skipped ")[1].startswith("0/12"), summary
    assert np.isfinite(fast).all() and np.abs(fast - compiled).mean() < 0.1


def test_few_steps_are_uncached_unless_calibrated(comfy, object_info):
    plain = cached_teacher(object_info, "step", 0.5, steps=4)
    _, log = logged(comfy, lambda: images(comfy, plain))
    assert "caching is off" in log and "Calibrate Cache" in log
    calibrated = copy.deepcopy(plain)
    ids = {v["class_type"]: k for k, v in calibrated.items()}
    sampler = calibrated[ids["KSampler"]]["inputs"]
    calibrated["99"] = {"class_type": "FastGenCalibrateCache", "inputs": {
        "model": calibrated["101"]["inputs"]["model"], "positive": sampler["positive"], "negative": sampler["negative"],
        "latent_image": sampler["latent_image"], "seed": 3, "steps": 4, "cfg": sampler["cfg"],
        "sampler_name": sampler["sampler_name"], "scheduler": sampler["scheduler"]}}
    calibrated["101"]["inputs"]["model"] = ["99", 0]
    entry, log = logged(comfy, lambda: comfy.run_prompt(calibrated))
    assert "calibrated profile" in log and "caching is off" not in log
    text = "\n".join(entry["outputs"]["99"]["text"])
    assert "4 steps, relative output change per step" in text


FLUX_BLOCK_CACHE = r"""
import importlib.util, json, sys, types, torch
sys.path.insert(0, sys.argv[1])
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import comfy.cli_args
comfy.cli_args.args.cpu = True
import utils.install_util  # noqa: F401
import comfy.ops, comfy.patcher_extension
from comfy.ldm.flux.model import Flux
spec = importlib.util.spec_from_file_location("fastgen_pack", sys.argv[2] + "/__init__.py", submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec); sys.modules["fastgen_pack"] = pack; spec.loader.exec_module(pack)
from fastgen_pack.nodes import cache as nodes_cache
from fastgen_pack.nodes.host.cache_blocks import adapter_for
from fastgen_pack.fastgen_core import cache

# a tiny Flux (2 double + 2 single blocks) with random weights, called the way the host calls it
dm = Flux(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64, hidden_size=64, mlp_ratio=2.0, num_heads=2,
          depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True,
          guidance_embed=False, operations=comfy.ops.disable_weight_init)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for p in dm.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
adapter = adapter_for(dm)
chain = adapter.chain()
patches = {}
for position, (kind, index) in enumerate(chain):
    name = "first" if position == 0 else "last" if position == len(chain) - 1 else "middle"
    patches[(kind, index)] = nodes_cache.block_patch(name)
wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"fastgen_cache": [nodes_cache.diffusion_model_wrapper]}}

def sample(threshold):
    sigmas = torch.linspace(1, 0, 13)
    run = None if threshold is None else cache.CacheRun(cache.CacheConfig(policy="block", threshold=threshold), sigmas)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(1, 32)
    with torch.no_grad():
        for i in range(12):
            options = {"sigmas": sigmas[i:i + 1], "uuids": ["cond"]}
            if run is not None:
                options.update({nodes_cache.RUN_KEY: nodes_cache.CacheHolder(run), "patches_replace": {"dit": patches},
                                "wrappers": wrappers})
            v = dm(x, sigmas[i:i + 1], context, y=y, transformer_options=options)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, run

reference, _ = sample(None)
exact, run0 = sample(0.0)
fast, run1 = sample(5.0)
print(json.dumps({"chain": len(chain), "exact": bool(torch.equal(exact, reference)), "blocks": run1.stats.blocks,
                  "blocks_skipped": run1.stats.blocks_skipped, "finite": bool(torch.isfinite(fast).all()),
                  "differs": not bool(torch.equal(fast, reference))}))
"""


def test_block_cache_on_a_tiny_flux_through_the_hosts_block_loop():
    """Flux cannot come through UNETLoader at test size (its detection fixes width 3072), so the
    host's Flux class is built directly and called with our wrapper and block patches in the
    transformer options, as the sampler would: double blocks, then single blocks on cat(txt, img)."""
    import json
    import subprocess
    import sys

    from comfy_host import REPO, find_comfyui

    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    result = subprocess.run([sys.executable, "-c", FLUX_BLOCK_CACHE, path, REPO], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["chain"] == 4 and out["exact"], out
    assert out["blocks_skipped"] > 0 and out["finite"] and out["differs"], out


def test_deep_cache_on_a_tiny_sd15_unet(comfy):
    """The block policy on an SD-family U-Net (DeepCache-like: shallow path on skipped calls)."""
    sd15 = {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd15.safetensors", "weight_dtype": "default"}}}

    def graph(model_nodes, link):
        prompt = wan_graph(model_nodes, link)
        prompt["c1"]["inputs"]["width"] = prompt["c2"]["inputs"]["width"] = 768
        prompt["l"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        return prompt

    reference, _ = run_latent(comfy, graph(sd15, ["m", 0]))
    exact, _ = run_latent(comfy, graph({**sd15, "c": cache_node(["m", 0], "block", 0.0)}, ["c", 0]))
    torch.testing.assert_close(exact, reference, rtol=0, atol=0)
    (fast, _), log = logged(comfy, lambda: run_latent(comfy, graph({**sd15, "c": cache_node(["m", 0], "block", 0.5)}, ["c", 0])))
    summary = [line for line in log.splitlines() if "FastGen Cache: skipped" in line][-1]
    assert "/60 blocks" in summary and " 0/60 blocks" not in summary, summary
    assert torch.isfinite(fast).all() and not torch.equal(fast, reference)
