"""Values sent through the API are checked when the prompt is queued, before any work, for every
FastGen node: ComfyUI v0.3.64 does not check a V3 combo's value against its choices, skips the
ranges of inputs a node's own validation takes (all of them when it takes **kwargs), and lets NaN
through every range check (`nan < min` is false; Python's JSON reader accepts NaN)."""

import copy
import json
import math

import pytest
from prompts import basic_scheduler, custom_sampler_prompt, teacher_prompt
from test_distill_node import distill_graph
from test_world_session import session_prompt

NAN = math.nan


def teacher_with(object_info, node_id, node, model_input=True):
    """The embedded-teacher prompt with `node` (a MODEL -> MODEL patch) before its KSampler."""
    prompt, ids = teacher_prompt(object_info)
    node = copy.deepcopy(node)
    if model_input:
        node["inputs"]["model"] = [ids["FastGenLoadModel"], 0]
        prompt[ids["KSampler"]]["inputs"]["model"] = [node_id, 0]
    prompt[node_id] = node
    return prompt, ids


def cache(**values):
    inputs = {"policy": "step", "threshold": 0.1, "start": 0.0, "end": 1.0, "max_skips": 4} | values
    return {"class_type": "FastGenCache", "inputs": inputs}


def quantize(**values):
    return {"class_type": "FastGenQuantizeModel", "inputs": {"format": "fp8", "layers": "", "calibrate": False, "steps": 2} | values}


def calibrate(object_info, **values):
    prompt, ids = teacher_prompt(object_info)
    cond = ids["FastGenDigitConditioning"]
    prompt["99"] = {"class_type": "FastGenCalibrateCache", "inputs": {
        "model": [ids["FastGenLoadModel"], 0], "positive": [cond, 0], "negative": [cond, 1],
        "latent_image": [ids["EmptyChromaRadianceLatentImage"], 0], "seed": 0, "steps": 8, "cfg": 3.0,
        "sampler_name": "euler", "scheduler": "simple"} | values}
    prompt[ids["KSampler"]]["inputs"]["model"] = ["99", 0]
    return prompt


def few_step_sampler(object_info, **values):
    prompt, ids = teacher_prompt(object_info)
    sampler = {"class_type": "FastGenSampler", "inputs": {"method": "multistep_sde", "gamma": 0.3} | values}
    return custom_sampler_prompt(prompt, ids, sampler, basic_scheduler(4))


def sigmas(object_info, **values):
    prompt, ids = teacher_prompt(object_info)
    sampler = {"class_type": "FastGenSampler", "inputs": {"method": "multistep_sde", "gamma": 0.3}}
    return custom_sampler_prompt(prompt, ids, sampler, lambda model: {
        "class_type": "FastGenSigmas", "inputs": {"model": model, "timesteps": "999, 499", "source": "timesteps"} | values})


def student_sampler(object_info, **values):
    prompt, ids = teacher_prompt(object_info)
    ks = prompt[ids["KSampler"]]["inputs"]
    prompt[ids["KSampler"]] = {"class_type": "FastGenStudentSampler", "inputs": {
        "model": ks["model"], "positive": ks["positive"], "latent_image": ks["latent_image"], "seed": 0, "steps": 2,
        "cfg": 1.0, "sampler": "euler", "scheduler": "simple", "denoise": 1.0} | values}
    return prompt


def student_lora(object_info, **values):
    return teacher_with(object_info, "99", {"class_type": "FastGenLoadStudentLoRA", "inputs": {
        "lora_name": "digit_test_lora.safetensors", "strength": 1.0} | values})[0]


CASES = {
    "cache policy": (lambda oi: teacher_with(oi, "99", cache(policy="bogus"))[0], "99", "policy input 'bogus' is not one of"),
    "cache threshold NaN": (lambda oi: teacher_with(oi, "99", cache(threshold=NAN))[0], "99", "threshold input is nan"),
    "cache max_skips": (lambda oi: teacher_with(oi, "99", cache(max_skips=0))[0], "99", "smaller than min of 1"),
    "calibrate sampler": (lambda oi: calibrate(oi, sampler_name="bogus"), "99", "sampler_name input 'bogus' is not one of"),
    "calibrate scheduler": (lambda oi: calibrate(oi, scheduler="bogus"), "99", "scheduler input 'bogus' is not one of"),
    "quantize format": (lambda oi: teacher_with(oi, "99", quantize(format="fp3"))[0], "99",
                        "format input 'fp3' is not one of its choices: fp8"),
    "few-step method": (lambda oi: few_step_sampler(oi, method="bogus"), "103", "method input 'bogus' is not one of"),
    "few-step gamma NaN": (lambda oi: few_step_sampler(oi, gamma=NAN), "103", "gamma input is nan"),
    "sigmas source": (lambda oi: sigmas(oi, source="bogus"), "104", "source input 'bogus' is not one of its choices: timesteps, recipe"),
    "student cfg NaN": (lambda oi: student_sampler(oi, cfg=NAN), None, "cfg input is nan"),
    "student denoise": (lambda oi: student_sampler(oi, denoise=-1.0), None, "denoise input -1.0 is below its minimum 0.0"),
    "lora strength NaN": (lambda oi: student_lora(oi, strength=NAN), "99", "strength input is nan"),
    "dmd learning_rate NaN": (lambda oi: dmd(learning_rate=NAN), "d", "learning_rate input is nan"),
    "dmd lora_rank": (lambda oi: dmd(lora_rank=0), "d", "smaller than min of 1"),
    "dmd iterations": (lambda oi: dmd(iterations=-5), "d", "smaller than min of 1"),
    "world max_fps NaN": (lambda oi: session_prompt(max_fps=NAN), "1", "max_fps input is nan"),
    "causal cuda_graphs": (lambda oi: causal(cuda_graphs="always"), "s", "cuda_graphs input 'always' is not one of its choices: off"),
}


def causal(**values):
    from test_world_nodes import causal_graph

    prompt = causal_graph()
    prompt["s"]["inputs"].update(values)
    return prompt


def dmd(**values):
    prompt = distill_graph("fastgen/never_trained")
    prompt["d"]["inputs"].update(values)
    return prompt


@pytest.mark.parametrize("case", list(CASES))
def test_bad_values_are_refused_when_queued(comfy, object_info, case):
    build, node_id, expected = CASES[case]
    prompt = build(object_info)
    if node_id is None:
        node_id = next(k for k, v in prompt.items() if v["class_type"] == "FastGenStudentSampler")
    status, body = comfy.post("/prompt", {"prompt": prompt})
    errors = json.dumps(body.get("node_errors", {}).get(node_id, {}))
    assert status == 400 and expected in errors, (status, json.dumps(body)[:1500])
