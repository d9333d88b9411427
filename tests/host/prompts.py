"""API prompts the host tests build from the shared embedded-teacher workflow."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
from comfy_host import REPO
from workflow_api import ui_to_api


def load_workflow(name):
    with open(os.path.join(REPO, "workflows", name)) as f:
        return json.load(f)


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def images(comfy, prompt):
    """Run a prompt; its output images as [N, H, W] grey arrays in 0..1, in batch order."""
    return np.stack([read_png(p) for p in sorted(comfy.output_files(comfy.run_prompt(prompt)))])


def teacher_prompt(object_info, seed=7, digits="3", batch_size=2, steps=8, cfg=3.0):
    """The embedded-teacher workflow as an API prompt, previewing instead of saving; returns the
    prompt and {class_type: node id}."""
    prompt = ui_to_api(load_workflow("embedded_teacher.json"), object_info)
    ids = {v["class_type"]: k for k, v in prompt.items()}
    prompt[ids["KSampler"]]["inputs"].update(seed=seed, steps=steps, cfg=cfg)
    prompt[ids["FastGenDigitConditioning"]]["inputs"]["digits"] = digits
    prompt[ids["EmptyChromaRadianceLatentImage"]]["inputs"]["batch_size"] = batch_size
    prompt[ids["SaveImage"]]["class_type"] = "PreviewImage"
    prompt[ids["SaveImage"]]["inputs"].pop("filename_prefix")
    return prompt, ids


def custom_sampler_prompt(prompt, ids, sampler, sigmas, cfg=3.0, seed=7, model_patch=None):
    """Replace the KSampler of a teacher prompt by CFGGuider + SamplerCustomAdvanced.
    `sampler` and `sigmas` are node dicts; `sigmas(model)` builds one from the model link;
    `model_patch(model)`, if given, is a MODEL -> MODEL node put in front of the guider."""
    custom = {k: copy.deepcopy(v) for k, v in prompt.items() if v["class_type"] != "KSampler"}
    model = [ids["FastGenLoadModel"], 0]
    guided_model = model
    if model_patch is not None:
        custom["101"] = model_patch(model)
        guided_model = ["101", 0]
    cond = ids["FastGenDigitConditioning"]
    custom.update({
        "102": {"class_type": "CFGGuider", "inputs": {"model": guided_model, "positive": [cond, 0], "negative": [cond, 1], "cfg": cfg}},
        "103": sampler,
        "104": sigmas(model),
        "105": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "106": {"class_type": "SamplerCustomAdvanced",
                "inputs": {"noise": ["105", 0], "guider": ["102", 0], "sampler": ["103", 0], "sigmas": ["104", 0],
                           "latent_image": [ids["EmptyChromaRadianceLatentImage"], 0]}},
    })
    custom[ids["VAEDecode"]]["inputs"]["samples"] = ["106", 0]
    return custom


def basic_scheduler(steps):
    def build(model):
        return {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": steps, "denoise": 1.0}}

    return build


# Text-encoder widths by the CLIPLoader type a workflow names (what the tiny models were built for).
CONDITIONING_WIDTHS = {"wan": 4096, "stable_diffusion": 768}
LATENT_SIZES_FOR_CPU = {"EmptyHunyuanLatentVideo": {"width": 32, "height": 32, "length": 5},
                        "EmptyLatentImage": {"width": 64, "height": 64}}


def runnable_here(prompt: dict) -> dict:
    """A workflow's prompt with what the test host cannot have swapped out, and nothing else.

    Text encoders and non-pixel VAEs are multi-GB downloads: CLIPTextEncode becomes a test node
    giving CONDITIONING of the encoder's shape, and VAE Decode + whatever consumes its frames become
    SaveLatent. Latent sizes shrink to CPU scale. The model path (loaders, LoRA, our nodes, sampler)
    runs as written, on the tiny models placed under the workflow's own file names.
    """
    prompt = copy.deepcopy(prompt)
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "CLIPTextEncode":
            clip_loader = prompt[node["inputs"]["clip"][0]]
            width = CONDITIONING_WIDTHS[clip_loader["inputs"]["type"]]
            prompt[node_id] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": int(node_id), "tokens": 8, "width": width}}
        elif node["class_type"] in LATENT_SIZES_FOR_CPU:
            node["inputs"].update(LATENT_SIZES_FOR_CPU[node["class_type"]])
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "VAEDecode" and prompt[node["inputs"]["vae"][0]]["inputs"].get("vae_name") != "pixel_space":
            consumers = [k for k, v in prompt.items() if any(isinstance(i, list) and i[0] == node_id for i in v["inputs"].values())]
            for consumer in consumers:
                del prompt[consumer]
            samples = node["inputs"]["samples"]
            prompt[node_id] = {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": "latents/wf"}}
    used = {i[0] for v in prompt.values() for i in v["inputs"].values() if isinstance(i, list)}
    for node_id, node in list(prompt.items()):
        if node["class_type"] in ("CLIPLoader", "VAELoader") and node_id not in used:
            del prompt[node_id]
    return prompt


def run_latent(comfy, prompt):
    """Run a prompt; (the saved latent, the history entry)."""
    from safetensors.torch import load_file

    entry = comfy.run_prompt(prompt)
    [path] = [p for p in comfy.output_files(entry) if p.endswith(".latent")]
    return load_file(path)["latent_tensor"], entry


def node_text(entry, node_id):
    """The text a node reported to the page after a run."""
    return "\n".join(entry["outputs"].get(node_id, {}).get("text", []))


def failure(comfy, prompt):
    """Run a prompt that must fail; the error message."""
    import pytest

    with pytest.raises(AssertionError) as err:
        comfy.run_prompt(prompt)
    return str(err.value)
