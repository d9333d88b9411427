"""Every workflow in workflows/ through the real ComfyUI executor on a GPU, and the node paths timed
beside their benchmarks (#18). A node is done when it has run here.

On the lent GPU, from the repository root, after `bash scripts/device_carry.sh` on this machine
(README, "Developers"):

    source scripts/device_env.sh && python benchmarks/gpu_host.py --out $OUT
    python benchmarks/gpu_host.py --only causal --dtypes bf16      # a subset
    python benchmarks/gpu_host.py --perf sampler,dmd,causal        # + the node-vs-reference timings
    python benchmarks/gpu_host.py --big                            # + Wan 2.1 14B and a Flux-size student

ComfyUI (v0.3.64) starts in this process as `python main.py` starts it (`start_comfyui`: its
allocator choice, paths, node loading, database, progress hook), with this pack and the test-only
node pack under custom_nodes; prompts run through `execution.PromptExecutor` on the GPU, a page
client id set so that progress and previews are produced as for a user. Models of the real
architectures and sizes are made here with random weights; a fixed random conditioning of the text
encoder's shape stands in for the text encoders (multi-GB downloads). Prints a table: workflow x
weight dtype x ok x seconds x peak GiB, with the host's load line and the nodes' own reports.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import glob
import importlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_TESTS = os.path.join(REPO, "tests", "host")
PACK_NAME = "comfyui-fastgen"
DEVICE = "cuda"  # "cpu" (--cpu --small): a smoke test of the harness itself
SMALL = False  # --small: tiny Wan models and small video latents
CLIENT = "gpu-host-harness"
WAN_SIZES = {"1.3B": dict(dim=1536, layers=30, ffn_dim=8960), "14B": dict(dim=5120, layers=40, ffn_dim=13824)}
TEXT = {"wan": (512, 4096, 0), "sdxl": (77, 2048, 1280), "flux": (256, 4096, 768)}  # tokens, width, pooled
SDXL_UNET = dict(adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                 use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", image_size=32)
FLUX_SCHNELL = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
                    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2,
                    qkv_bias=True, guidance_embed=False)


# --- the host ---------------------------------------------------------------------------------------


class LoadLines(logging.Handler):
    """The host's "model weight dtype X, manual cast: Y" lines, per prompt."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        match = re.search(r"model weight dtype (\S+), manual cast: (\S+)", record.getMessage())
        if match:
            self.lines.append(f"{match[1].replace('torch.', '')}/{match[2].replace('torch.', '')}")


class PageStandIn:
    """The websocket of a page that queued the prompts: messages to it are accepted and dropped (the
    host still encodes them), and nodes that stream to the queuing page see it connected."""

    async def send_json(self, data):
        pass

    async def send_bytes(self, data):
        pass

    async def send_str(self, data):
        pass


class Host:
    def __init__(self, comfy_path: str, base: str, host_args: list[str]):
        sys.argv = [os.path.join(comfy_path, "main.py"), "--base-directory", base, "--database-url", "sqlite:///:memory:",
                    "--disable-auto-launch", "--disable-api-nodes", *(["--cpu"] if DEVICE == "cpu" else []), *host_args]
        sys.path.insert(0, comfy_path)
        os.chdir(comfy_path)
        if DEVICE == "cpu":  # the index's CUDA torchvision beside a CPU torch (tests/host/launch_comfyui.py)
            import types

            sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        # what `python main.py` does before torch is imported: parse its arguments, then cudaMallocAsync
        # where the GPU supports it
        importlib.import_module("comfy.options").enable_args_parsing()
        importlib.import_module("utils.install_util")  # the host's utils package, before comfy/utils.py can shadow it
        cuda_malloc = importlib.import_module("cuda_malloc")
        main = importlib.import_module("main")
        main.cuda_malloc = cuda_malloc  # main.py binds it only when run as a script
        import comfy.cli_args
        import comfy.model_management
        import execution

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        _, self.server, _ = main.start_comfyui(self.loop)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self.server.publish_loop(), self.loop)
        self.server.sockets[CLIENT] = PageStandIn()
        self.args, self.mm, self.execution = comfy.cli_args.args, comfy.model_management, execution
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self.load_lines = LoadLines()
        logging.getLogger().addHandler(self.load_lines)
        import torch

        self.torch = torch
        self.allocator = torch.cuda.get_allocator_backend() if DEVICE == "cuda" else "cpu"

    def object_info(self) -> dict:
        from comfy_api.internal import _ComfyNodeInternal

        import nodes

        out = {}
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            out[name] = cls.GET_NODE_INFO_V1() if issubclass(cls, _ComfyNodeInternal) else {"input": cls.INPUT_TYPES()}
        return out

    def weight_dtype(self, name: str | None):
        """None: the host's own choice; "fp16" / "bf16": what --fp16-unet / --bf16-unet force."""
        self.args.fp16_unet, self.args.bf16_unet = name == "fp16", name == "bf16"

    def fresh(self):
        """Forget cached outputs and loaded models (the next prompt loads its models anew). The page
        closes and reopens first, so that a World Session from an earlier prompt stops playing."""
        self.server.sockets.pop(CLIENT, None)
        time.sleep(1.0)
        self.server.sockets[CLIENT] = PageStandIn()
        self.executor.reset()
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()

    def run(self, prompt: dict) -> dict:
        torch = self.torch
        prompt_id = uuid.uuid4().hex
        valid = asyncio.run_coroutine_threadsafe(self.execution.validate_prompt(prompt_id, prompt, None), self.loop).result()
        if not valid[0]:
            return {"ok": False, "error": f"invalid prompt: {json.dumps(valid[1])[:300]} {json.dumps(valid[3])[:600]}",
                    "seconds": 0.0, "peak_gib": 0.0, "texts": {}, "loads": []}
        self.load_lines.lines = []
        cuda = DEVICE == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        self.executor.execute(prompt, prompt_id, {"client_id": CLIENT}, valid[2])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        try:
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        except RuntimeError:  # an allocator backend without peak statistics
            peak = float("nan")
        error = ""
        for kind, data in self.executor.status_messages:
            if kind == "execution_error":
                error = f"{data['node_type']}: {data['exception_type']}: {data['exception_message']}".strip()
                error += " | " + "".join(data.get("traceback", [])[-2:]).replace("\n", " ")[-600:]
        texts = {node: "\n".join(out.get("text", [])) for node, out in self.executor.history_result.get("outputs", {}).items()
                 if out.get("text")}
        return {"ok": self.executor.success, "error": error, "seconds": seconds, "peak_gib": peak, "texts": texts,
                "loads": list(self.load_lines.lines)}


# --- model files of the real architectures (random weights, made on the GPU) ---------------------------


def _random_like_shapes(shapes: dict, dtype, seed: int = 0) -> dict:
    """Weights that keep activations finite through deep stacks: norm scales 1, biases 0, matrices and
    kernels N(0, 1 / fan_in)."""
    import torch

    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if len(shape) <= 1:
            fill = 1.0 if key.endswith(("weight", "scale")) and "norm" in key else 0.0
            out[key] = torch.full(shape, fill, device=DEVICE, dtype=dtype)
        else:
            fan_in = 1
            for n in shape[1:]:
                fan_in *= n
            out[key] = (torch.randn(shape, generator=gen, device=DEVICE) / fan_in**0.5).to(dtype)
    return out


def _meta_shapes(build) -> dict:
    import torch

    with torch.device("meta"):
        net = build()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _save(state: dict, path: str, recipe=None):
    from safetensors.torch import save_file

    from fastgen_core.recipe import RECIPE_KEY

    metadata = {RECIPE_KEY: recipe.to_json()} if recipe is not None else None
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
    return path


def make_models(base: str, big: bool, perf: set[str], workflows: bool = True) -> dict:
    """The model files the workflows name, at their real sizes; returns {what: description}. The 14B
    Wan (`big`) only when the workflows run: the timings use the 1.3B one."""
    import torch
    from tiny_models import tiny_wan_state_dict

    from fastgen_core.recipe import Recipe
    from fastgen_core.tiny_vae import TinyVideoDecoder

    models = os.path.join(base, "models")
    made = {}
    start = time.perf_counter()
    wan = tiny_wan_state_dict(**(dict(dim=256, layers=2) if SMALL else WAN_SIZES["1.3B"]), dtype=torch.bfloat16, device=DEVICE)
    _save(wan, os.path.join(models, "diffusion_models", "self_forcing_dmd.safetensors"))
    made["Wan 2.1 1.3B"] = f"{sum(v.numel() for v in wan.values()) / 1e9:.2f} B params, bf16"
    lora_model = wan
    if big and workflows:
        wan14 = tiny_wan_state_dict(**WAN_SIZES["14B"], dtype=torch.bfloat16, device=DEVICE)
        _save(wan14, os.path.join(models, "diffusion_models", "wan2.1_t2v_14B_fp16.safetensors"))
        made["Wan 2.1 14B"] = f"{sum(v.numel() for v in wan14.values()) / 1e9:.2f} B params, bf16"
        lora_model = wan14
        del wan14
    else:  # the LoRA workflow runs on the 1.3B model under its file name (the table says so)
        os.symlink(os.path.join(models, "diffusion_models", "self_forcing_dmd.safetensors"),
                   os.path.join(models, "diffusion_models", "wan2.1_t2v_14B_fp16.safetensors"))
    _save(lightx2v_lora(lora_model), os.path.join(models, "loras", "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"))
    del wan, lora_model
    _save(wan_vae_state(), os.path.join(models, "vae", "wan_2.1_vae.safetensors"))
    gen = torch.Generator().manual_seed(5)
    tiny = {f"decoder.{k}": (torch.randn(v.shape, generator=gen) * 0.05).half()
            for k, v in TinyVideoDecoder(16).decoder.state_dict().items()}
    _save(tiny, os.path.join(models, "vae_approx", "taew2_1.safetensors"))
    if "sampler" in perf:
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        shapes = _meta_shapes(lambda: UNetModel(**SDXL_UNET, operations=comfy.ops.disable_weight_init))
        sdxl = _random_like_shapes(shapes, torch.float16)
        recipe = Recipe(family="sdxl", prediction="eps", steps=4, timesteps=[999, 749, 499, 249], cfg=1.0,
                        sampler="multistep_sde", method="dmd2")
        _save(sdxl, os.path.join(models, "diffusion_models", "sdxl_dmd2_random.safetensors"), recipe)
        made["SDXL UNet"] = f"{sum(v.numel() for v in sdxl.values()) / 1e9:.2f} B params, fp16"
        del sdxl
        if big:
            from comfy.ldm.flux.model import Flux

            shapes = _meta_shapes(lambda: Flux(**FLUX_SCHNELL, operations=comfy.ops.disable_weight_init))
            flux = _random_like_shapes(shapes, torch.bfloat16)
            recipe = Recipe(family="flux", prediction="flow", steps=4, scheduler="simple", cfg=1.0, shift=None,
                            sampler="euler", method="adversarial")
            _save(flux, os.path.join(models, "diffusion_models", "flux_schnell_random.safetensors"), recipe)
            made["Flux transformer (schnell config)"] = f"{sum(v.numel() for v in flux.values()) / 1e9:.2f} B params, bf16"
            del flux
    torch.cuda.empty_cache()
    made["(made in)"] = f"{time.perf_counter() - start:.0f} s"
    return made


def lightx2v_lora(model: dict, rank: int = 32) -> dict:
    """A LoRA in the layout of lightx2v's Wan LoRAs: diffusion_model.<module>.lora_down / lora_up /
    alpha on every Linear of the blocks, and .diff_b for their biases, bf16."""
    import torch

    gen = torch.Generator(device=DEVICE).manual_seed(2)
    out = {}
    for key, value in model.items():
        if not key.startswith("blocks.") or value.ndim != 2:
            continue
        module = "diffusion_model." + key[: -len(".weight")]
        n_out, n_in = value.shape
        out[f"{module}.lora_down.weight"] = (torch.randn(rank, n_in, generator=gen, device=DEVICE) / n_in**0.5).bfloat16()
        out[f"{module}.lora_up.weight"] = (torch.randn(n_out, rank, generator=gen, device=DEVICE) * 0.01).bfloat16()
        out[f"{module}.alpha"] = torch.tensor(float(rank))
        out[f"{module}.diff_b"] = torch.zeros(n_out, device=DEVICE, dtype=torch.bfloat16)
    return out


def wan_vae_state() -> dict:
    """The Wan 2.1 VAE at its real width (the host fixes it), random, fp16."""
    import torch
    from comfy.ldm.wan.vae import WanVAE

    shapes = _meta_shapes(lambda: WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                         temperal_downsample=[False, True, True]))
    state = _random_like_shapes(shapes, torch.float16)
    for key in state:
        if key.endswith("gamma"):
            state[key].fill_(1.0)
    return state


# --- workflows ---------------------------------------------------------------------------------------


def on_gpu(prompt: dict, dmd_iterations: int, weight_dtype: str | None, tag: str = "") -> dict:
    """A workflow's prompt as it runs here: the text encoders give way to a fixed random
    conditioning of their output's shape; training is cut to `dmd_iterations`; UNETLoader loads with
    `weight_dtype` ("fp8_e4m3fn") where one is given. Everything else runs as written."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "CLIPTextEncode":
            tokens, width, pooled = TEXT[prompt[node["inputs"]["clip"][0]]["inputs"]["type"]]
            prompt[node_id] = {"class_type": "FastGenTestConditioning",
                               "inputs": {"seed": int(node_id), "tokens": tokens, "width": width, "pooled": pooled}}
        elif node["class_type"] == "FastGenDistillDMD":  # a new name per pass: the node refuses to overwrite
            node["inputs"].update(iterations=dmd_iterations, save_name=node["inputs"]["save_name"] + tag)
        elif node["class_type"] == "UNETLoader" and weight_dtype:
            node["inputs"]["weight_dtype"] = weight_dtype
        elif SMALL and node["class_type"] in SMALL_LATENTS:
            node["inputs"].update(SMALL_LATENTS[node["class_type"]])
    for node_id in [k for k, v in prompt.items() if v["class_type"] == "CLIPLoader"]:
        del prompt[node_id]
    return prompt


SMALL_LATENTS = {"EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 33}}


def run_workflows(host: Host, dtypes: list[str], only: str, dmd_iterations: int) -> list[dict]:
    from workflow_api import ui_to_api

    info = host.object_info()
    paths = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
    paths = [p for p in paths if not only or re.search(only, os.path.basename(p))]
    # the World Session keeps playing in the background after its prompt: last
    paths.sort(key=lambda p: "world_model_play" in p)
    rows = []
    for dtype in dtypes:
        for path in paths:
            with open(path) as f:
                api = ui_to_api(json.load(f), info)
            has_unet = any(n["class_type"] == "UNETLoader" for n in api.values())
            if dtype == "fp8" and not has_unet:
                continue  # fp8 weights are a UNETLoader option
            host.weight_dtype(None if dtype == "fp8" else dtype)
            host.fresh()
            prompt = on_gpu(api, dmd_iterations, "fp8_e4m3fn" if dtype == "fp8" else None, f"_{dtype}")
            result = host.run(prompt)
            warm = host.run(_reseeded(prompt)) if result["ok"] else None
            rows.append({"workflow": os.path.basename(path), "dtype": dtype, **result,
                         "warm_seconds": warm["seconds"] if warm and warm["ok"] else None})
            print(_row(rows[-1]), flush=True)
    host.weight_dtype(None)
    return rows


def _reseeded(prompt: dict, offset: int = 1) -> dict:
    """The same prompt with new seeds, so that the samplers run again (upstream nodes stay cached)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        for key in ("seed", "noise_seed"):
            if isinstance(node["inputs"].get(key), int) and node["class_type"] != "FastGenTestConditioning":
                node["inputs"][key] += offset
        if node["class_type"] == "FastGenDistillDMD":
            node["inputs"]["save_name"] += "_again"
    return prompt


def _row(r: dict) -> str:
    warm = f"{r['warm_seconds']:.2f}" if r.get("warm_seconds") is not None else "-"
    status = "ok" if r["ok"] else "FAILED"
    loads = ",".join(sorted(set(r["loads"]))) or "-"
    line = f"| {r['workflow']} | {r['dtype']} | {status} | {r['seconds']:.2f} | {warm} | {r['peak_gib']:.2f} | {loads} |"
    if not r["ok"]:
        line += f"\n    error: {r['error']}"
    for node, text in r["texts"].items():
        line += f"\n    node {node}: " + text.replace("\n", " / ")[:400]
    return line


# --- node paths against their references --------------------------------------------------------------


def student_sampler_perf(host: Host, big: bool, repeats: int = 5) -> list[str]:
    """Student KSampler vs the host's SamplerCustomAdvanced with the same sigmas, 4 steps at 1024^2:
    latency (median of `repeats` warm runs, interleaved) and the share of the compute floor."""
    lines = []
    cases = [("sdxl_dmd2_random.safetensors", "EmptyLatentImage", "sdxl")]
    if big:
        cases.append(("flux_schnell_random.safetensors", "EmptySD3LatentImage", "flux"))
    for name, latent_node, family in cases:
        host.weight_dtype(None)
        host.fresh()
        tokens, width, pooled = TEXT[family]
        common = {
            "m": {"class_type": "FastGenLoadStudent", "inputs": {"student_name": name}},
            "c": {"class_type": "FastGenTestConditioning", "inputs": {"seed": 1, "tokens": tokens, "width": width, "pooled": pooled}},
            "l": {"class_type": latent_node, "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        }
        node = dict(common, s={"class_type": "FastGenStudentSampler", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["c", 0], "latent_image": ["l", 0], "seed": 0, "steps": 0,
            "cfg": 0.0, "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
            out={"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "perf/node"}})
        stock = dict(common, sig={"class_type": "FastGenSigmas", "inputs": {"model": ["m", 0], "timesteps": "999", "source": "recipe"}},
                     g={"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["c", 0], "negative": ["c", 0], "cfg": 1.0}},
                     # the host's lcm is the recipe's multistep_sde: x0, then fresh noise at the next sigma
                     k={"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
                     n={"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
                     s={"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["n", 0], "guider": ["g", 0], "sampler": ["k", 0],
                                                                          "sigmas": ["sig", 0], "latent_image": ["l", 0]}},
                     out={"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "perf/stock"}})
        times = {"node": [], "stock": []}
        first = {}
        for i in range(repeats + 1):  # the first of each loads the model and warms up: not timed
            for label, prompt in (("node", node), ("stock", stock)):
                prompt = copy.deepcopy(prompt)
                prompt["s" if label == "node" else "n"]["inputs"]["seed" if label == "node" else "noise_seed"] = i
                result = host.run(prompt)
                if not result["ok"]:
                    lines.append(f"{family}: {label} FAILED: {result['error']}")
                    break
                if i == 0:
                    first[label] = result
                else:
                    times[label].append(result["seconds"])
        if not times["node"] or not times["stock"] or len(times["node"]) != len(times["stock"]):
            continue
        node_s, stock_s = statistics.median(times["node"]), statistics.median(times["stock"])
        flops = model_flops(host, family)
        floor = 4 * flops / (PEAK_TFLOPS * 1e12)
        lines.append(f"{family} 1024^2, 4 steps: Student KSampler {node_s * 1e3:.1f} ms, SamplerCustomAdvanced {stock_s * 1e3:.1f} ms "
                     f"(median of {repeats}; ratio {node_s / stock_s:.3f}); compute floor {4 * flops / 1e12:.1f} TFLOP "
                     f"= {floor * 1e3:.1f} ms at {PEAK_TFLOPS:.0f} TFLOP/s -> {floor / node_s:.0%} of the floor; "
                     f"peak {first['node']['peak_gib']:.1f} GiB; node: {first['node']['texts'].get('s', '')[:200]}")
        print(lines[-1], flush=True)
    return lines


PEAK_TFLOPS = 750.0  # measured bf16 GEMM rate (benchmarks/RESULTS.md); replaced by this run's own measurement


def measure_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def model_flops(host: Host, family: str) -> float:
    """FLOPs of one forward of the loaded diffusion model at 1024^2, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    loaded = [m for m in host.mm.current_loaded_models if m.model is not None]
    if not loaded:
        return float("nan")
    base = loaded[0].model.model
    dm, dtype = base.diffusion_model, base.get_dtype()
    tokens, width, pooled = TEXT[family]
    context = torch.randn(1, tokens, width, device="cuda", dtype=dtype)
    t = torch.full((1,), 500.0, device="cuda", dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if family == "sdxl":
            dm(torch.randn(1, 4, 128, 128, device="cuda", dtype=dtype), t, context=context,
               y=torch.randn(1, 2816, device="cuda", dtype=dtype))
        else:
            dm(torch.randn(1, 16, 128, 128, device="cuda", dtype=dtype), t / 1000, context=context,
               y=torch.randn(1, pooled, device="cuda", dtype=dtype))
    return float(counter.get_total_flops())


CAUSAL_SETTINGS = {"compile+kept": (True, "kept"), "compile": (True, "off"), "kept": (False, "kept"), "eager": (False, "off")}


def _sync_sites(torch, run, top: int = 12) -> list[str]:
    """Where `run()` makes the CPU wait for the GPU: PyTorch's sync debug mode warns at each
    synchronising call; the Python stack of each warning is cut to its last frames in the host or
    the pack, and the sites are counted."""
    import traceback
    import warnings
    from collections import Counter

    sites = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if "/comfy" in f.filename or "/ComfyUI" in f.filename or PACK_NAME in f.filename
                or "fastgen" in f.filename]
        sites[" < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(ours[-3:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{count:4d} x {site}" for site, count in sites.most_common(top)]


def causal_perf(host: Host, settings: list[str], videos: int = 5, profile_dir: str | None = None,
                checks: bool = False) -> list[str]:
    """The Causal Video Sampler node (tiny decoder; Wan-1.3B size, 832x480, 81 frames) through the
    executor, `videos` Queues per setting of compile / cuda_graphs in this process: the node's own
    timing report of each (with compile + kept graphs the first compiles, the second captures, later
    ones replay: compare those with `benchmarks/causal_video.py --variants compile+chunkgraphs+tiny
    --warmup-videos 2`). The frames go to a sink, not a file: no encoding in the prompt's time.
    `profile_dir`: one more Queue of the first setting under the profiler, with its GPU idle gaps.
    `checks` (after the profile: they load the model anew): two Queues of one seed, the second with
    the context pass and the decoder on the
    sampling stream (no side streams): their latents must agree (the streams' ordering); then one
    Queue under PyTorch's sync debug mode, listing where the CPU waits for the GPU."""
    from workflow_api import ui_to_api

    host.weight_dtype(None)
    host.fresh()
    with open(os.path.join(REPO, "workflows", "causal_video_fast.json")) as f:
        prompt = on_gpu(ui_to_api(json.load(f), host.object_info()), 0, None)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "FastGenCausalVideoSampler")
    for node_id in [k for k, v in prompt.items() if v["class_type"] == "SaveAnimatedWEBP"]:
        prompt[node_id] = {"class_type": "FastGenTestSink", "inputs": {"images": [sampler, 1]}}
    lines = []

    def queue(label, p):
        result = host.run(p)
        text = result["texts"].get(sampler, "").replace("\n", " / ")
        lines.append(f"causal node [{label}]: {'ok' if result['ok'] else 'FAILED ' + result['error']}; prompt "
                     f"{result['seconds']:.2f} s; peak {result['peak_gib']:.1f} GiB; {text}")
        print(lines[-1], flush=True)

    for setting in settings:
        compile, graphs = CAUSAL_SETTINGS[setting]
        prompt[sampler]["inputs"].update(compile=compile, cuda_graphs=graphs)
        for i in range(videos):
            queue(f"{setting}, allocator {host.allocator}, Queue {i + 1}", _reseeded(prompt, offset=i))
            if i == 0 and compile and setting == settings[0]:  # the process's first compile: where its time went
                import torch._dynamo.utils

                times = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
                lines.append(f"causal node [{setting}, Queue 1] compiler time (torch._dynamo.utils.compile_times, "
                             f"seconds in all): " + " ".join(times.split())[:1500])
                print(lines[-1], flush=True)
    if profile_dir:
        import gpu_gaps

        compile, graphs = CAUSAL_SETTINGS[settings[0]]
        prompt[sampler]["inputs"].update(compile=compile, cuda_graphs=graphs)
        torch = host.torch
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with gpu_gaps.annotated(), torch.profiler.profile(activities=activities) as prof:
            queue(f"{settings[0]}, profiled", _reseeded(prompt, offset=1000))  # seeds no earlier Queue had
        os.makedirs(profile_dir, exist_ok=True)
        path = os.path.join(profile_dir, "causal_trace.json")
        prof.export_chrome_trace(path)
        lines += [f"causal node [{settings[0]}, profiled] {line}" for line in gpu_gaps.gap_report(path)]
        print("\n".join(lines[-20:]), flush=True)
        subprocess.run(["gzip", "-f", path], check=False)
    if checks:
        import gpu_gaps

        causal_loop = gpu_gaps.module_named("*.nodes.host.causal_loop")
        torch = host.torch
        checked = _reseeded(prompt, offset=2000)

        def latent():
            result = host.run(checked)
            return host.executor.caches.outputs.get(sampler)[0][0]["samples"].float() if result["ok"] else result["error"]

        beside, side_stream = latent(), causal_loop._side_stream
        causal_loop._side_stream = lambda device, purpose: torch.cuda.current_stream(device)
        try:
            host.executor.reset()  # the same prompt again: not from the cache
            serial = latent()
        finally:
            causal_loop._side_stream = side_stream
        if isinstance(beside, str) or isinstance(serial, str):
            lines.append(f"causal node [stream check]: FAILED {beside if isinstance(beside, str) else serial}")
        else:
            difference = float((beside - serial).abs().max())
            lines.append(f"causal node [stream check]: side streams vs one stream, same seed: max |difference| "
                         f"{difference:.3g} (latent scale {float(serial.abs().max()):.3g})")
        print(lines[-1], flush=True)
        sites = _sync_sites(torch, lambda: host.run(_reseeded(prompt, offset=3000)))
        lines += [f"causal node [sync sites, one Queue] {site}" for site in sites] or ["causal node [sync sites]: none"]
        print("\n".join(lines[-len(sites) or -1:]), flush=True)
    return lines


def dmd_perf(host: Host, iterations: int = 10) -> list[str]:
    """FastGen DMD Distill on the Wan-1.3B-size teacher at benchmarks/distill.py's settings (832x480,
    81 frames = 21 latent frames, batch 1, 4-step student, update ratio 2, LoRA rank 64, gradient
    checkpointing), `iterations` iterations: seconds per iteration and peak memory."""
    host.weight_dtype(None)
    host.fresh()
    tokens, width, _ = TEXT["wan"]
    prompt = {
        "m": {"class_type": "UNETLoader", "inputs": {"unet_name": "self_forcing_dmd.safetensors", "weight_dtype": "default"}},
        "c": {"class_type": "FastGenTestConditioning", "inputs": {"seed": 1, "tokens": tokens, "width": width}},
        "n": {"class_type": "FastGenTestConditioning", "inputs": {"seed": 2, "tokens": tokens, "width": width}},
        "l": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 832, "height": 480, "length": 81, "batch_size": 1,
                                                                  **(SMALL_LATENTS["EmptyHunyuanLatentVideo"] if SMALL else {})}},
        "d": {"class_type": "FastGenDistillDMD", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["n", 0], "latent": ["l", 0], "student_steps": 4,
            "iterations": iterations, "learning_rate": 1e-5, "lora_rank": 64, "guidance": 5.0, "update_ratio": 2,
            "batch_size": 1, "seed": 0, "save_name": f"fastgen/wan_dmd_{uuid.uuid4().hex[:6]}", "resume": False,
            "gradient_checkpointing": True}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["d", 2]}},
    }
    import gpu_gaps

    trainer = gpu_gaps.module_named("*.fastgen_core.distill").DMDTrainer
    step, seconds = trainer.train_step, []

    def timed_step(self, *args, **kwargs):  # each step ends in .item() of its losses: the GPU is done
        start = time.perf_counter()
        try:
            return step(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    trainer.train_step = timed_step
    try:
        result = host.run(prompt)
    finally:
        trainer.train_step = step
    # iterations 0, 2, 4 ... update the student too (update ratio 2); the first two warm up
    student, fake = seconds[2::2], seconds[3::2]
    per_step = (f"student iteration {statistics.median(student):.2f} s, fake-score iteration {statistics.median(fake):.2f} s "
                f"(medians of {len(student)} / {len(fake)} after 2 warm-up)" if student and fake else "no steady iterations")
    line = (f"DMD node, Wan-1.3B size, 832x480x81 (21 latent frames), rank 64, update ratio 2, {iterations} iterations, "
            f"gradient checkpointing: "
            f"{'ok' if result['ok'] else 'FAILED ' + result['error']}; prompt {result['seconds']:.1f} s; {per_step}; "
            f"peak {result['peak_gib']:.1f} GiB; node: {result['texts'].get('d', '')[:300]}")
    print(line, flush=True)
    return [line]


# --- main ----------------------------------------------------------------------------------------------


def prepare_base(base: str):
    for sub in ("custom_nodes", "input", "output", "temp", "user", "models/diffusion_models", "models/loras", "models/vae",
                "models/vae_approx", "models/text_encoders"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(REPO, os.path.join(base, "custom_nodes", PACK_NAME))
    os.symlink(os.path.join(HOST_TESTS, "test_nodes"), os.path.join(base, "custom_nodes", "fastgen_test_nodes"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--dtypes", default="fp16,bf16,fp8", help="weight dtypes: fp16 / bf16 (--fp16-unet / --bf16-unet), "
                        "fp8 (UNETLoader weight_dtype fp8_e4m3fn, workflows that load with it)")
    parser.add_argument("--only", default="", help="regex on workflow file names")
    parser.add_argument("--no-workflows", action="store_true")
    parser.add_argument("--perf", default="", help="comma list of sampler, causal, dmd")
    parser.add_argument("--causal-settings", default="compile+kept", help="comma list of "
                        f"{', '.join(CAUSAL_SETTINGS)}: the Causal Video Sampler's compile / cuda_graphs in --perf causal")
    parser.add_argument("--causal-videos", type=int, default=5, help="Queues per causal setting")
    parser.add_argument("--profile", action="store_true", help="with --perf causal: one more Queue under the profiler; "
                        "prints where the GPU waits (benchmarks/gpu_gaps.py) and leaves the trace in --out")
    parser.add_argument("--causal-checks", action="store_true", help="with --perf causal: the side streams' results "
                        "against one stream, and where the CPU waits for the GPU (PyTorch's sync debug mode)")
    parser.add_argument("--big", action="store_true", help="Wan 2.1 14B for the LoRA workflow, and a Flux-size student")
    parser.add_argument("--dmd-iterations", type=int, default=20)
    parser.add_argument("--host-args", default="", help="more main.py arguments, e.g. --disable-cuda-malloc")
    parser.add_argument("--out", default=None, help="folder for gpu_host.json")
    parser.add_argument("--small", action="store_true", help="tiny Wan models and small video latents")
    parser.add_argument("--cpu", action="store_true", help="with --small: a smoke test of the harness on a CPU")
    args = parser.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        sys.exit("set COMFYUI_PATH (or --comfyui) to a ComfyUI v0.3.64 checkout (scripts/device_env.sh does on the device)")
    perf = {p for p in args.perf.split(",") if p}
    global DEVICE, SMALL
    DEVICE, SMALL = ("cpu" if args.cpu else "cuda"), args.small
    sys.path[:0] = [REPO, HOST_TESTS]
    base = tempfile.mkdtemp(prefix="fastgen-gpu-host-")
    prepare_base(base)
    started = time.perf_counter()
    host = Host(os.path.abspath(args.comfyui), base, args.host_args.split())
    import torch

    global PEAK_TFLOPS
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    if DEVICE == "cuda":
        PEAK_TFLOPS = measure_peak_tflops()
    print(f"# host up in {time.perf_counter() - started:.1f} s; {device_name}, torch {torch.__version__}, "
          f"allocator {host.allocator}; bf16 GEMM {PEAK_TFLOPS:.0f} TFLOP/s", flush=True)
    made = make_models(base, args.big, perf, workflows=not args.no_workflows)
    print("# models: " + "; ".join(f"{k}: {v}" for k, v in made.items()), flush=True)
    print("# text encoders: a fixed random conditioning of their output's shape (umt5 512x4096; SDXL 77x2048 + 1280; "
          "Flux 256x4096 + 768)", flush=True)
    results = {"device": device_name, "torch": torch.__version__, "allocator": host.allocator,
               "models": made, "workflows": [], "perf": []}
    if not args.no_workflows:
        print("| workflow | weights | result | cold s | warm s | peak GiB | host load (weights/manual cast) |", flush=True)
        print("|---|---|---|---|---|---|---|", flush=True)
        results["workflows"] = run_workflows(host, [d for d in args.dtypes.split(",") if d], args.only, args.dmd_iterations)
    profile_dir = (args.out or base) if args.profile else None
    for name, fn in (("sampler", lambda: student_sampler_perf(host, args.big)),
                     ("causal", lambda: causal_perf(host, args.causal_settings.split(","), args.causal_videos, profile_dir,
                                                        args.causal_checks)),
                     ("dmd", lambda: dmd_perf(host))):
        if name in perf:
            try:
                results["perf"] += fn()
            except Exception:
                results["perf"].append(f"{name}: harness error {traceback.format_exc()[-1500:]}")
                print(results["perf"][-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_host.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    # the summary last: a device call returns the end of the output
    print("\n## summary", flush=True)
    print("# models: " + "; ".join(f"{k}: {v}" for k, v in made.items()))
    if results["workflows"]:
        print("| workflow | weights | result | cold s | warm s | peak GiB | host load (weights/manual cast) |")
        print("|---|---|---|---|---|---|---|")
        for row in results["workflows"]:
            print(_row(row).split("\n")[0] + ("" if row["ok"] else f"  {row['error'][:300]}"))
    for line in results["perf"]:
        print(line)
    failed = [r for r in results["workflows"] if not r["ok"]]
    print(f"# {len(results['workflows']) - len(failed)} of {len(results['workflows'])} workflow runs succeeded", flush=True)
    os._exit(1 if failed else 0)  # the World Session's and the host's threads would keep the process alive


if __name__ == "__main__":
    main()
