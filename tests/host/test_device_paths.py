"""The samplers as the host calls them on a GPU: latents and sigmas on the device, the model's
own model_sampling. A simulated second device (tests/simulated_device.py) makes a tensor created
on the CPU fail here as it fails on CUDA (the Student KSampler and the Causal Video Sampler did)."""

import pytest
import torch
from comfy_host import import_host_in_process, import_pack_module

from tests.simulated_device import DEVICE, SimulatedDevice, on_device, values


@pytest.fixture(scope="module")
def host():
    def load():
        import comfy.model_sampling
        import comfy.supported_models_base

        return comfy.model_sampling, import_pack_module("nodes.sampling"), import_pack_module("nodes.adapters.recipes")

    return import_host_in_process(load)


def _model_samplings(model_sampling):
    class Flow(model_sampling.ModelSamplingDiscreteFlow, model_sampling.CONST):
        pass

    class Eps(model_sampling.ModelSamplingDiscrete, model_sampling.EPS):
        pass

    flow = Flow()
    flow.set_parameters(shift=5.0, multiplier=1000)
    return {"flow": flow, "eps": Eps()}


class _GuidedModel:
    """What a KSAMPLER function receives: model(x, sigma, **extra) -> x0, and the model_sampling
    at model.inner_model.inner_model.model_sampling."""

    def __init__(self, model_sampling):
        self.inner_model = type("Inner", (), {"inner_model": type("Base", (), {"model_sampling": model_sampling})()})()

    def __call__(self, x, sigma, **extra):
        return 0.5 * x / (1.0 + sigma.reshape(-1, *([1] * (x.ndim - 1))))


@pytest.mark.parametrize("kind", ["flow", "eps"])
def test_every_few_step_method_runs_with_latents_and_sigmas_on_the_device(host, kind):
    model_sampling_module, node_sampling, recipes = host
    model_sampling = _model_samplings(model_sampling_module)[kind]
    sigmas = recipes.recipe_sigmas(model_sampling, recipes.Recipe(family="test", prediction="flow", steps=4,
                                                                 timesteps=[999, 749, 499, 249]))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    model = _GuidedModel(model_sampling)
    for method in node_sampling.METHODS:
        fn = node_sampling.sampler_function(method, gamma=0.3)
        on_cpu = fn(model, x, sigmas, extra_args={"seed": 1}, callback=None, disable=True)
        with SimulatedDevice():
            out = fn(model, on_device(x), on_device(sigmas), extra_args={"seed": 1}, callback=None, disable=True)
            assert out.device == DEVICE, method
        torch.testing.assert_close(values(out), on_cpu, rtol=1e-6, atol=1e-6, msg=method)


def test_host_alpha_follows_the_device_of_sigma(host):
    model_sampling_module, _, recipes = host
    flow = _model_samplings(model_sampling_module)["flow"]
    with SimulatedDevice():
        alpha = recipes.host_alpha(flow)(on_device(torch.tensor(0.25)))
        assert alpha.device == DEVICE
    assert float(values(alpha)) == pytest.approx(0.75)
