"""#3 in the real host: student loaders, the student LoRA loader and the Student KSampler on tiny
real architectures (Wan 2.1 and SD1.5 built from synthetic state dicts), plus our SAMPLER / SIGMAS
through SamplerCustomAdvanced on them."""

import os

import pytest
import torch
from conftest import TINY_WAN_RECIPE
from prompts import failure, node_text, run_latent

WAN = {"conditioning_width": 4096, "latent": {"class_type": "EmptyHunyuanLatentVideo",
                                              "inputs": {"width": 32, "height": 32, "length": 1, "batch_size": 1}}}
SD15 = {"conditioning_width": 768, "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def graph(model_nodes: dict, model_link, family=WAN, sampler_node=None, seed=3):
    """{id: node} for: model nodes -> sampler node (Student KSampler by default) -> SaveLatent."""
    prompt = dict(model_nodes)
    prompt["c1"] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": 0, "tokens": 8, "width": family["conditioning_width"]}}
    prompt["c2"] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": 1, "tokens": 8, "width": family["conditioning_width"]}}
    prompt["l"] = family["latent"]
    prompt["s"] = sampler_node or student_sampler(model_link)
    prompt["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/fastgen"}}
    return prompt


def student_sampler(model_link, seed=3, steps=0, cfg=0.0, sampler="recipe", negative=False):
    inputs = {"model": model_link, "positive": ["c1", 0], "latent_image": ["l", 0], "seed": seed, "steps": steps, "cfg": cfg,
              "sampler": sampler, "scheduler": "recipe", "denoise": 1.0}
    if negative:
        inputs["negative"] = ["c2", 0]
    return {"class_type": "FastGenStudentSampler", "inputs": inputs}



def load_student(name):
    return {"m": {"class_type": "FastGenLoadStudent", "inputs": {"student_name": name}}}


def unet(name):
    return {"m": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}


def test_student_loader_lists_students_and_reads_the_recipe_from_metadata(comfy, object_info):
    options = object_info["FastGenLoadStudent"]["input"]["required"]["student_name"][1]["options"]
    for name in ("tiny_wan_student.safetensors", "tiny_wan_fastgen.pth", "tiny_sd15.safetensors", "embedded/digit_teacher.safetensors"):
        assert name in options
    latent, entry = run_latent(comfy, graph(load_student("tiny_wan_student.safetensors"), ["m", 0]))
    assert latent.shape == (1, 16, 1, 4, 4) and torch.isfinite(latent).all()
    assert "from the file's fastgen.recipe metadata" in node_text(entry, "m")
    assert "4 steps" in node_text(entry, "s") and "multistep_sde" in node_text(entry, "s")


def test_student_ksampler_equals_the_same_recipe_built_from_stock_nodes(comfy):
    """The one-node sampler applies shift, timesteps, sampler and cfg exactly as the stock graph would."""
    ours, _ = run_latent(comfy, graph(load_student("tiny_wan_student.safetensors"), ["m", 0]))
    stock = graph({
        **unet("tiny_wan_student.safetensors"),
        "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["m", 0], "shift": TINY_WAN_RECIPE["shift"]}},
        "sig": {"class_type": "FastGenSigmas", "inputs": {"model": ["shift", 0], "source": "timesteps",
                                                           "timesteps": ",".join(map(str, TINY_WAN_RECIPE["timesteps"]))}},
        "smp": {"class_type": "FastGenSampler", "inputs": {"method": TINY_WAN_RECIPE["sampler"], "gamma": 0.3}},
        "g": {"class_type": "CFGGuider", "inputs": {"model": ["shift", 0], "positive": ["c1", 0], "negative": ["c2", 0], "cfg": 1.0}},
        "n": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
    }, None, sampler_node={"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["n", 0], "guider": ["g", 0], "sampler": ["smp", 0], "sigmas": ["sig", 0], "latent_image": ["l", 0]}})
    theirs, _ = run_latent(comfy, stock)
    torch.testing.assert_close(ours, theirs)
    unshifted = dict(stock, sig=dict(stock["sig"], inputs=dict(stock["sig"]["inputs"], model=["m", 0])),
                     g=dict(stock["g"], inputs=dict(stock["g"]["inputs"], model=["m", 0])))
    assert not torch.allclose(ours, run_latent(comfy, unshifted)[0]), "the recipe's shift made no difference"


def test_recipe_overrides_warn(comfy):
    _, entry = run_latent(comfy, graph(load_student("tiny_wan_student.safetensors"), ["m", 0],
                                       sampler_node=student_sampler(["m", 0], steps=6, cfg=3.0, negative=True)))
    text = node_text(entry, "s")
    assert "CFG-distilled" in text and "trained for 4 steps" in text
    message = failure(comfy, graph(load_student("tiny_wan_student.safetensors"), ["m", 0],
                                   sampler_node=student_sampler(["m", 0], cfg=3.0)))
    assert "needs a negative conditioning" in message


def test_fastgen_training_checkpoint_loads_its_ema_weights(comfy):
    ema, _ = run_latent(comfy, graph(load_student("tiny_wan_fastgen.pth"), ["m", 0],
                                     sampler_node=student_sampler(["m", 0], steps=2, cfg=1.0, sampler="euler")))
    raw, _ = run_latent(comfy, graph(load_student("tiny_wan_student.safetensors"), ["m", 0],
                                     sampler_node=student_sampler(["m", 0], steps=2, cfg=1.0, sampler="euler")))
    assert torch.isfinite(ema).all() and not torch.allclose(ema, raw)  # net_ema (seed 1), not net (seed 0)


def test_student_without_recipe_asks_for_settings(comfy):
    prompt = graph(load_student("tiny_wan.safetensors"), ["m", 0])
    message = failure(comfy, prompt)
    assert "carries no recipe, so set steps, cfg, sampler" in message
    latent, entry = run_latent(comfy, graph(load_student("tiny_wan.safetensors"), ["m", 0],
                                            sampler_node=student_sampler(["m", 0], steps=2, cfg=1.0, sampler="euler")))
    assert torch.isfinite(latent).all()
    assert "no recipe found" in node_text(entry, "m")


def test_code_pickle_is_refused_and_never_runs(comfy):
    message = failure(comfy, graph(load_student("tiny_wan_pickled_code.pth"), ["m", 0]))
    assert "refused to load" in message and "weights_only=True" in message
    assert not os.path.exists(os.path.join(comfy.base, "payload-ran"))


@pytest.mark.parametrize("family,model,prefix", [(WAN, "tiny_wan.safetensors", "tiny_wan"), (SD15, "tiny_sd15.safetensors", "tiny_sd15")])
def test_lora_in_every_key_format_loads_completely(comfy, family, model, prefix):
    def sampled(lora_nodes, link):
        return run_latent(comfy, graph({**unet(model), **lora_nodes}, link, family,
                                       sampler_node=student_sampler(link, steps=2, cfg=1.0, sampler="euler")))[0]

    base = sampled({}, ["m", 0])
    log_before = len(comfy.log())
    for fmt in ("comfy", "peft", "kohya"):
        lora = f"{prefix}_lora_{fmt}.safetensors"
        ours = sampled({"lora": {"class_type": "FastGenLoadStudentLoRA",
                                 "inputs": {"model": ["m", 0], "lora_name": lora, "strength": 1.0}}}, ["lora", 0])
        stock = sampled({"lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": lora,
                                                                                   "strength_model": 1.0}}}, ["lora", 0])
        assert not torch.allclose(ours, base), f"{fmt} LoRA changed nothing"
        torch.testing.assert_close(ours, stock)
    log = comfy.log()[log_before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log and "NOT LOADED" not in log


def test_wrong_loras_are_refused_with_the_reason(comfy):
    def lora_on_wan(name):
        return graph({**unet("tiny_wan.safetensors"),
                      "lora": {"class_type": "FastGenLoadStudentLoRA", "inputs": {"model": ["m", 0], "lora_name": name, "strength": 1.0}}},
                     ["lora", 0], sampler_node=student_sampler(["lora", 0], steps=1, cfg=1.0, sampler="euler"))

    message = failure(comfy, lora_on_wan("digit_test_lora.safetensors"))
    assert "does not fit this wan2.1 model" in message and "made for fastgen-digits" in message
    message = failure(comfy, lora_on_wan("tiny_sd15_lora_kohya.safetensors"))
    assert "does not fit" in message and "made for sd15" in message
    message = failure(comfy, lora_on_wan("wan_dim384_lora.safetensors"))
    assert "other sizes" in message and "384x384" in message


@pytest.mark.parametrize("family,model", [(WAN, "tiny_wan.safetensors"), (SD15, "tiny_sd15.safetensors")])
@pytest.mark.parametrize("method", ["multistep_sde", "multistep_ode", "tcd", "ab2", "dpmpp_2m"])
def test_our_sampler_and_sigmas_run_through_sampler_custom_advanced(comfy, family, model, method):
    def sample(seed):
        return run_latent(comfy, graph({
            **unet(model),
            "sig": {"class_type": "FastGenSigmas", "inputs": {"model": ["m", 0], "source": "timesteps", "timesteps": "999, 749, 499, 249"}},
            "smp": {"class_type": "FastGenSampler", "inputs": {"method": method, "gamma": 0.3}},
            "g": {"class_type": "CFGGuider", "inputs": {"model": ["m", 0], "positive": ["c1", 0], "negative": ["c2", 0], "cfg": 2.0}},
            "n": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        }, None, family, sampler_node={"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["n", 0], "guider": ["g", 0], "sampler": ["smp", 0], "sigmas": ["sig", 0], "latent_image": ["l", 0]}}))[0]

    first, again = sample(5), sample(5)
    assert torch.isfinite(first).all() and first.abs().sum() > 0
    torch.testing.assert_close(first, again)  # same seed, same latent (also for the stochastic methods)


def test_wan_workflow_recognises_lightx2v_and_samples_by_its_recipe(comfy, object_info):
    from prompts import load_workflow, runnable_here
    from workflow_api import ui_to_api

    prompt = runnable_here(ui_to_api(load_workflow("wan_step_distill_lora.json"), object_info))
    ids = {v["class_type"]: k for k, v in prompt.items()}
    latent, entry = run_latent(comfy, prompt)
    assert latent.shape == (1, 16, 2, 4, 4) and torch.isfinite(latent).all()
    assert "recognised as lightx2v" in node_text(entry, ids["FastGenLoadStudentLoRA"])
    used = node_text(entry, ids["FastGenStudentSampler"])
    # timesteps 1000, 750, 500, 250 at shift 5: sigma = 5t / (1 + 4t) with t = timestep / 1000
    assert used.startswith("4 steps, cfg 1, multistep_sde, sigmas 1, 0.938, 0.833, 0.625, 0"), used
    assert "warning" not in used


def test_diffusers_layout_wan_student_loads_as_the_same_model(comfy):
    """ComfyUI v0.3.64 cannot load diffusers-layout Wan; the student loader converts it itself."""
    def sampled(name):
        return run_latent(comfy, graph(load_student(name), ["m", 0], sampler_node=student_sampler(["m", 0], steps=2, cfg=1.0,
                                                                                                   sampler="euler")))[0]

    log_before = len(comfy.log())
    torch.testing.assert_close(sampled("tiny_wan_diffusers.safetensors"), sampled("tiny_wan.safetensors"))
    log = comfy.log()[log_before:]
    assert "unet missing" not in log and "unet unexpected" not in log and "left over keys" not in log


def test_student_models_still_take_core_lora_and_easycache(comfy):
    """The loaders' MODELs are native: a core LoRA and EasyCache stack on them and keep the recipe."""
    nodes = {
        **unet("tiny_wan.safetensors"),
        "student": {"class_type": "FastGenLoadStudentLoRA", "inputs": {"model": ["m", 0], "strength": 1.0,
                    "lora_name": "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"}},
        "style": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["student", 0], "lora_name": "tiny_wan_lora_kohya.safetensors",
                                                                   "strength_model": 1.0}},
        "cache": {"class_type": "EasyCache", "inputs": {"model": ["style", 0], "reuse_threshold": 0.2, "start_percent": 0.15,
                                                         "end_percent": 0.95, "verbose": False}},
    }
    plain = dict(nodes)
    plain.pop("style")
    plain["cache"] = dict(nodes["cache"], inputs=dict(nodes["cache"]["inputs"], model=["student", 0]))
    with_style, entry = run_latent(comfy, graph(nodes, ["cache", 0]))
    assert torch.isfinite(with_style).all()
    assert node_text(entry, "s").startswith("4 steps, cfg 1, multistep_sde"), "the recipe did not survive the core patches"
    assert not torch.allclose(with_style, run_latent(comfy, graph(plain, ["cache", 0]))[0]), "the core LoRA had no effect"


def test_a_bad_sampler_name_is_the_nodes_input_and_refused_before_any_work(comfy):
    """The host (v0.3.64) does not check a V3 combo's value: a name sent through the API must be
    refused when the prompt is validated, blaming the node's input and listing its choices."""
    import json

    for name, value in (("sampler", "bogus"), ("scheduler", "nope")):
        node = student_sampler(["m", 0])
        node["inputs"][name] = value
        status, body = comfy.post("/prompt", {"prompt": graph(load_student("tiny_wan_student.safetensors"), ["m", 0],
                                                              sampler_node=node)})
        errors = json.dumps(body.get("node_errors", {}).get("s", {}))
        assert status == 400 and f"the node's {name} input '{value}' is not one of its choices: recipe" in errors, body
        assert "recipe names" not in errors
        assert ("multistep_sde, " if name == "sampler" else "sgm_uniform, ") in errors


def test_a_linked_bad_sampler_name_blames_the_node_input():
    """A value that arrives through a link is not seen by validation: the node says whose it was."""
    from comfy_host import import_host_in_process, import_pack_module

    students = import_host_in_process(lambda: import_pack_module("nodes.host.samplers"))
    with pytest.raises(ValueError, match=r"the node's sampler input 'bogus' is not one of its choices: recipe, multistep_sde"):
        students.plan_sampling(None, 0, 0.0, "bogus", "recipe")
    with pytest.raises(ValueError, match=r"the student's recipe names sampler 'gone', .* set the node's sampler input"):
        students.recipe_sampler("gone", None)
