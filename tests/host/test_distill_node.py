"""#4 in the real host: the DMD node trains a LoRA student of the embedded teacher from a graph."""

import os

import pytest
import torch
from safetensors import safe_open
from test_students_nodes import failure, node_text, run_latent

from fastgen_core.recipe import RECIPE_KEY, Recipe


def distill_graph(save_name, resume=False, iterations=6, seed=0):
    return {
        "m": {"class_type": "FastGenLoadModel", "inputs": {"model_name": "embedded/digit_teacher.safetensors"}},
        "c": {"class_type": "FastGenDigitConditioning", "inputs": {"digits": "0123456789"}},
        "l": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "d": {"class_type": "FastGenDistillDMD", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["c", 1], "latent": ["l", 0], "student_steps": 2,
            "iterations": iterations, "learning_rate": 1e-3, "lora_rank": 4, "guidance": 3.0, "update_ratio": 2, "batch_size": 2,
            "seed": seed, "save_name": save_name, "resume": resume}},
        "chart": {"class_type": "PreviewImage", "inputs": {"images": ["d", 1]}},
        "s": {"class_type": "FastGenStudentSampler", "inputs": {
            "model": ["d", 0], "positive": ["c", 0], "latent_image": ["l", 0], "seed": 1, "steps": 0, "cfg": 0.0,
            "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
        "out": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/dmd"}},
    }


def test_dmd_node_trains_saves_and_returns_the_student(comfy):
    latent, entry = run_latent(comfy, distill_graph("fastgen/test_student"))
    assert torch.isfinite(latent).all()
    assert "6 iterations; saved fastgen/test_student.safetensors" in node_text(entry, "d")
    assert entry["outputs"]["chart"]["images"], "no loss chart"
    assert node_text(entry, "s").startswith("2 steps, cfg 1, multistep_sde, sigmas 0.999, 0.5, 0")

    path = os.path.join(comfy.base, "models", "loras", "fastgen", "test_student.safetensors")
    with safe_open(path, "pt") as f:
        recipe = Recipe.from_json(f.metadata()[RECIPE_KEY])
        keys = list(f.keys())
    assert (recipe.method, recipe.steps, recipe.sigmas, recipe.family) == ("dmd2", 2, [0.999, 0.5], "fastgen-digits")
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert os.path.isfile(path[: -len(".safetensors")] + ".resume.pt")

    # the saved LoRA loads in the host's own LoraLoader with nothing left over, and in ours with its recipe
    log_before = len(comfy.log())
    stock = {"m": {"class_type": "FastGenLoadModel", "inputs": {"model_name": "embedded/digit_teacher.safetensors"}},
             "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": "fastgen/test_student.safetensors",
                                                                       "strength_model": 1.0}},
             "ours": {"class_type": "FastGenLoadStudentLoRA", "inputs": {"model": ["m", 0], "lora_name": "fastgen/test_student.safetensors",
                                                                          "strength": 1.0}},
             "c": {"class_type": "FastGenDigitConditioning", "inputs": {"digits": "3"}},
             "l": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
             "s": {"class_type": "FastGenStudentSampler", "inputs": {
                 "model": ["ours", 0], "positive": ["c", 0], "latent_image": ["l", 0], "seed": 1, "steps": 0, "cfg": 0.0,
                 "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
             "k": {"class_type": "KSampler", "inputs": {"model": ["lora", 0], "positive": ["c", 0], "negative": ["c", 1],
                                                        "latent_image": ["l", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
             "out": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/dmd"}},
             "out2": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "latents/dmd_stock"}}}
    entry = comfy.run_prompt(stock)
    assert "from the file's fastgen.recipe metadata" in node_text(entry, "ours")
    log = comfy.log()[log_before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/../../b", ""])
def test_dmd_node_refuses_bad_save_names(comfy, bad):
    message = failure(comfy, distill_graph(bad))
    assert "save_name" in message


def test_dmd_node_never_overwrites_and_resumes(comfy):
    run_latent(comfy, distill_graph("fastgen/resumable", iterations=4))
    message = failure(comfy, distill_graph("fastgen/resumable", iterations=4, seed=1))
    assert "already exists" in message
    _, entry = run_latent(comfy, distill_graph("fastgen/resumable", iterations=8, resume=True))
    assert "8 iterations" in node_text(entry, "d")
