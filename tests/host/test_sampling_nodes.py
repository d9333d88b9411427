"""#3 in the real host: timestep -> sigma against the host's own model_sampling objects, and our
SAMPLER / SIGMAS through SamplerCustomAdvanced."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfy_host import find_comfyui
from prompts import basic_scheduler, custom_sampler_prompt, images, teacher_prompt

from fastgen_core import sampling

TIMESTEPS = [999, 937.5, 749, 500, 499, 250.25, 249, 100, 1, 0]

HOST_SIGMAS = r"""
import importlib.util, json, sys, types, torch
sys.path.insert(0, sys.argv[1])
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
import comfy.model_sampling as ms

class Config:
    def __init__(self, **settings):
        self.sampling_settings = settings

# the pack, imported as ComfyUI imports it, for the node layer's own conversion
spec = importlib.util.spec_from_file_location("fastgen_pack", sys.argv[3] + "/__init__.py", submodule_search_locations=[sys.argv[3]])
pack = importlib.util.module_from_spec(spec); sys.modules["fastgen_pack"] = pack; spec.loader.exec_module(pack)
from fastgen_pack.nodes.host.recipes import host_timestep_to_sigma

timesteps = json.loads(sys.argv[2])
samplings = {"discrete": ms.ModelSamplingDiscrete(Config()), "flux_shift_1.15": ms.ModelSamplingFlux(Config(shift=1.15)),
             "flux_mu_log3": ms.ModelSamplingFlux(Config(shift=__import__("math").log(3.0)))}
for shift in (1.0, 3.0, 5.0):
    samplings[f"flow_{shift}"] = ms.ModelSamplingDiscreteFlow(Config(shift=shift, multiplier=1000))
samplings["flow_multiplier_1"] = ms.ModelSamplingDiscreteFlow(Config(shift=1.0, multiplier=1.0))
out = {}
for name, sampling in samplings.items():
    out[name] = {"host": [float(sampling.sigma(torch.tensor(float(t)))) for t in timesteps],
                 "node": [float(host_timestep_to_sigma(sampling, t)) for t in timesteps]}
print(json.dumps(out))
"""


def test_timestep_to_sigma_matches_the_hosts_model_sampling():
    from comfy_host import REPO

    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    result = subprocess.run([sys.executable, "-c", HOST_SIGMAS, path, json.dumps(TIMESTEPS), REPO], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    host = json.loads(result.stdout)
    t = torch.tensor(TIMESTEPS)
    # the core's own conversions equal the host's objects
    ours = sampling.discrete_timestep_to_sigma(t, sampling.discrete_sigma_table())
    torch.testing.assert_close(ours, torch.tensor(host["discrete"]["host"]), rtol=1e-6, atol=1e-6)
    for shift in (1.0, 3.0, 5.0):
        expected = torch.tensor(host[f"flow_{shift}"]["host"])
        torch.testing.assert_close(sampling.flow_timestep_to_sigma(t, shift), expected, rtol=1e-6, atol=1e-6)
        # the node passes timesteps straight through for multiplier-1000 flow models (Wan, SD3)
        torch.testing.assert_close(torch.tensor(host[f"flow_{shift}"]["node"]), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.tensor(host["discrete"]["node"]), torch.tensor(host["discrete"]["host"]), rtol=1e-6, atol=1e-6)
    # multiplier-1 flow models (ours, Chroma) and Flux read t / 1000: 999 is nearly pure noise there too
    torch.testing.assert_close(torch.tensor(host["flow_multiplier_1"]["node"]), sampling.flow_timestep_to_sigma(t, 1.0),
                               rtol=1e-6, atol=1e-6)
    assert host["flux_shift_1.15"]["node"][0] > 0.99 and host["flux_shift_1.15"]["node"][-1] == 0.0
    # Flux-type shift mu is the linear flow shift exp(mu): how a recipe's shift reaches FLUX / Qwen-Image
    torch.testing.assert_close(torch.tensor(host["flux_mu_log3"]["node"]), sampling.flow_timestep_to_sigma(t, 3.0), rtol=1e-5, atol=1e-6)


def digits_prompt(object_info, method, sigmas):
    prompt, ids = teacher_prompt(object_info, seed=5, digits="0123456789", batch_size=10)
    sampler = {"class_type": "FastGenSampler", "inputs": {"method": method, "gamma": 0.3}}
    return custom_sampler_prompt(prompt, ids, sampler, sigmas, cfg=3.0, seed=5)


@pytest.mark.parametrize("method", ["multistep_sde", "multistep_ode", "tcd", "ab2", "dpmpp_2m", "euler"])
def test_every_method_draws_digits_through_sampler_custom_advanced(comfy, object_info, method):
    from fastgen_core.eval import load_classifier, predict

    drawn = images(comfy, digits_prompt(object_info, method, basic_scheduler(12)))
    predicted = predict(load_classifier(), torch.tensor(drawn)[:, None, 2:-2, 2:-2])
    assert (predicted == torch.arange(10)).sum().item() >= 8, (method, predicted.tolist())


def test_timestep_sigmas_node_runs_and_converts_through_the_model(comfy, object_info):
    def timesteps(model):
        return {"class_type": "FastGenSigmas", "inputs": {"model": model, "timesteps": "999, 749, 499, 249"}}

    drawn = images(comfy, digits_prompt(object_info, "multistep_ode", timesteps))
    assert drawn.shape == (10, 32, 32) and np.isfinite(drawn).all()
    prompt = digits_prompt(object_info, "multistep_ode", timesteps)
    prompt["104"]["inputs"]["timesteps"] = "249, 999"
    status, body = comfy.post("/prompt", {"prompt": prompt})
    assert status == 400 and "decrease" in json.dumps(body)
