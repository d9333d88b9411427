"""The recipe format and the table of known public students."""

import re

import pytest

from fastgen_core.recipe import KNOWN_STUDENTS, Recipe, identify_student


def test_every_field_round_trips_through_json():
    recipe = Recipe(family="flux", prediction="flow", steps=8, sampler="tcd", cfg=1.0, shift=None, scheduler="simple", gamma=0.3,
                    lora_strength=0.125, method="hyper-sd", teacher="flux-dev", source="https://example.org/card",
                    extra={"flux_guidance": 3.5})
    assert Recipe.from_json(recipe.to_json()) == recipe
    with pytest.raises(ValueError, match="gamma"):
        Recipe(family="x", prediction="eps", steps=4, gamma=1.5)


@pytest.mark.parametrize("filename,kind,family,expected_name,steps", [
    ("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", "lora", "wan2.1", "lightx2v", 4),
    ("Wan21_I2V_14B_lightx2v_cfg_step_distill_lora_rank64.safetensors", "lora", "wan2.2", "lightx2v", 4),  # 2.1 LoRAs serve 2.2
    ("dmd2_sdxl_4step_unet_fp16.safetensors", "model", "sdxl", "DMD2 SDXL 4-step", 4),
    ("dmd2_sdxl_4step_lora_fp16.safetensors", "lora", "sdxl", "DMD2 SDXL 4-step LoRA", 4),
    ("Wan21_CausVid_14B_T2V_lora_rank32_v2.safetensors", "lora", "wan2.1", "CausVid", 9),
    ("Hyper-SDXL-1step-lora.safetensors", "lora", "sdxl", "Hyper-SD 1-step unified LoRA (SDXL)", 1),
    ("sdxl_lightning_8step_lora.safetensors", "lora", "sdxl", "SDXL-Lightning LoRA", 8),
    ("sdxl_lightning_2step_unet.safetensors", "model", "sdxl", "SDXL-Lightning", 2),
    ("Hyper-SDXL-4steps-lora.safetensors", "lora", "sdxl", "Hyper-SDXL LoRA", 4),
    ("Hyper-SDXL-12steps-CFG-lora.safetensors", "lora", "sdxl", "Hyper-SDXL CFG-preserving LoRA", 12),
    ("Hyper-SD15-1step-lora.safetensors", "lora", "sd15", "Hyper-SD 1-step unified LoRA (SD1.5)", 1),
    ("Hyper-SD15-2steps-lora.safetensors", "lora", "sd15", "Hyper-SD1.5 LoRA", 2),
    ("Hyper-FLUX.1-dev-16steps-lora.safetensors", "lora", "flux", "Hyper-FLUX.1-dev LoRA", 16),
    ("flux1-schnell-fp8.safetensors", "model", "flux", "FLUX.1 schnell", 4),
    ("Qwen-Image-Lightning-4steps-V1.0.safetensors", "lora", "qwen-image", "Qwen-Image-Lightning", 4),
])
def test_known_students_are_recognised_by_file_name(filename, kind, family, expected_name, steps):
    student = identify_student(filename, family=family, kind=kind)
    assert student is not None and student.name.startswith(expected_name), student
    assert student.recipe.steps == steps
    assert student.recipe.source.startswith("https://")
    if student.recipe.timesteps is not None:
        assert len(student.recipe.timesteps) == steps


def test_identification_respects_family_kind_and_keys():
    # a lightx2v-named file on an SDXL model is not taken for lightx2v; a LoRA is not a full model
    assert identify_student("Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors", family="sdxl") is None
    assert identify_student("dmd2_sdxl_4step_lora_fp16.safetensors", kind="model", family="sdxl").kind == "model"
    assert identify_student("my_model.safetensors", family="sdxl") is None
    # DMD2's 1-step UNet starts from unit-variance noise at t=399, which a sigma schedule cannot express: not in the table
    assert identify_student("dmd2_sdxl_1step_unet_fp16.bin", family="sdxl", kind="model") is None
    # FLUX without the guidance embedder is schnell, whatever the file is called
    schnell = identify_student("flux_renamed.safetensors", keys=["double_blocks.0.img_attn.qkv.weight"], family="flux", kind="model")
    assert schnell is not None and schnell.name == "FLUX.1 schnell"
    assert identify_student("flux_dev.safetensors", keys=["guidance_in.in_layer.weight"], family="flux", kind="model") is None


def test_table_recipes_are_consistent():
    names = [s.name for s in KNOWN_STUDENTS]
    assert len(names) == len(set(names))
    for student in KNOWN_STUDENTS:
        assert student.kind in ("model", "lora") and (student.file_pattern or student.key_rule)
        # distilled students in the table run without CFG unless their card says otherwise
        assert student.recipe.cfg == 1.0 or "CFG" in student.name


def test_multistep_noise_names_the_renoising_of_multistep_recipes_only():
    assert Recipe(family="x", prediction="flow", steps=2, sampler="multistep_ode").multistep_noise() == "ode"
    assert Recipe(family="x", prediction="flow", steps=2, sampler="multistep_sde").multistep_noise("ode") == "sde"
    assert Recipe(family="x", prediction="flow", steps=2, sampler="euler").multistep_noise("ode") == "ode"


@pytest.mark.parametrize("field, value, reason", [
    ("steps", 10**9, "steps must be an integer in 1..1000"),
    ("steps", "4", "steps must be an integer"),
    ("steps", True, "steps must be an integer"),
    ("cfg", float("nan"), "cfg must be a finite number"),
    ("shift", float("inf"), "shift must be a finite number"),
    ("lora_strength", "1", "lora_strength must be a finite number"),
    ("sampler", ["euler"], "sampler must be a string"),
    ("family", 3, "family must be a string"),
    ("timesteps", [999, "x", 1, 0], "timesteps must be a list of finite numbers in [0, 1000]"),
    ("timesteps", [5000, 750, 500, 250], "timesteps must be a list of finite numbers in [0, 1000]"),
    ("sigmas", [1.0, float("nan"), 0.5, 0.25], "sigmas must be a list of finite numbers"),
    ("extra", [1], "extra must be an object"),
])
def test_recipes_from_files_are_checked_for_type_and_range(field, value, reason):
    """A file's recipe is its author's word: a huge step count or NaN cfg is refused when read,
    naming the file, not when a sampler allocates or produces NaN images."""
    import json

    values = {"family": "sdxl", "prediction": "eps", "steps": 4, "sampler": "euler", field: value}
    with pytest.raises(ValueError, match=f"evil.safetensors: bad 'fastgen.recipe' .*{re.escape(reason)}"):
        Recipe.from_json(json.dumps(values), source="evil.safetensors")
