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

        return comfy.model_sampling, import_pack_module("nodes.host.samplers"), import_pack_module("nodes.host.recipes")

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


@pytest.fixture(scope="module")
def wan():
    def load():
        import comfy.ldm.wan.model
        import comfy.ops

        return comfy.ldm.wan.model, import_pack_module("nodes.host.wan_causal"), import_pack_module("fastgen_core.world")

    return import_host_in_process(load)


def test_the_causal_forwards_timestep_embedding_copies_nothing_from_the_cpu(wan):
    """The host's Wan embedding copies a CPU arange to the device at every forward (on CUDA a
    blocking copy: the CPU waits for the GPU); the causal run's equals it without the copy."""
    wan_model, wan_causal, _ = wan
    t = torch.tensor([937.5, 250.0])
    with SimulatedDevice() as host_mode:
        host = wan_model.sinusoidal_embedding_1d(256, on_device(t))
    with SimulatedDevice() as ours_mode:
        ours = wan_causal.timestep_embedding_on_device(256, on_device(t))
        assert ours.device == DEVICE
    assert host_mode.copies_from_cpu >= 1  # what the test catches
    assert ours_mode.copies_from_cpu == 0
    assert torch.equal(values(ours), values(host))  # the same operations on the same values


def _tiny_wan(wan_model):
    import comfy.ops

    model = wan_model.WanModel(patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=32, ffn_dim=64, freq_dim=16, text_dim=8,
                               out_dim=4, num_heads=2, num_layers=2, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def test_a_causal_forward_waits_for_the_context_pass_and_swaps_the_embedding_only_while_it_runs(wan):
    wan_model, wan_causal, world = wan
    model = _tiny_wan(wan_model)
    run = wan_causal.WanCausalRun(model, world.KVCache(token_dim=1))
    host_embedding = wan_model.sinusoidal_embedding_1d
    seen = []

    class Event:  # the context pass's CUDA event
        def wait(self):
            seen.append("waited")

    def forward(*args, **kwargs):
        seen.append(wan_model.sinusoidal_embedding_1d is wan_causal.timestep_embedding_on_device)
        return "out"

    run.context_done = Event()
    options = {wan_causal.RUN_KEY: run}
    assert wan_causal.causal_forward(forward, "x", "t", "context", None, None, options) == "out"
    assert seen == ["waited", True]  # the wait is queued before anything of the forward
    assert run.context_done is None and wan_model.sinusoidal_embedding_1d is host_embedding

    def failing(*args, **kwargs):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        wan_causal.causal_forward(failing, "x", "t", "context", None, None, options)
    assert wan_model.sinusoidal_embedding_1d is host_embedding
    assert wan_causal.causal_forward(forward, "x", "t", "context", None, None, {}) == "out"
    assert seen[-1] is False  # not a causal run: the host's own function


def test_the_causal_wan_forward_equals_the_hosts_with_the_embedding_swapped(wan):
    """The wrapper through the host's own WanModel.forward (DIFFUSION_MODEL wrappers): same output."""
    from comfy.patcher_extension import WrappersMP

    wan_model, wan_causal, world = wan
    model = _tiny_wan(wan_model)
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 2, 4, 4, generator=generator), torch.randn(1, 8, 8, generator=generator)
    t = torch.tensor([500.0])
    with torch.no_grad():
        plain = model(x, t, context, transformer_options={})
        run = wan_causal.WanCausalRun(model, world.KVCache(token_dim=1))
        swapped = []

        def recording(executor, *args, **kwargs):
            return wan_causal.causal_forward(lambda *a, **k: (swapped.append(
                wan_model.sinusoidal_embedding_1d is wan_causal.timestep_embedding_on_device), executor(*a, **k))[1],
                *args, **kwargs)

        options = {wan_causal.RUN_KEY: run, "wrappers": {WrappersMP.DIFFUSION_MODEL: {"k": [recording]}}}
        wrapped = model(x, t, context, transformer_options=options)
    assert swapped == [True]
    assert torch.equal(wrapped, plain)


def test_wan_latent_formats_on_the_device_copy_nothing_per_call_and_give_the_same_values():
    """The host's Wan21 latent format copies its CPU mean and std at every process_in / process_out
    (on CUDA a blocking copy); moved once, its calls copy nothing and give the same values."""
    def load():
        import comfy.latent_formats

        return comfy.latent_formats, import_pack_module("nodes.host.devices"), import_pack_module("nodes.host.tiny_decoder")

    latent_formats, devices, tiny_vae = import_host_in_process(load)
    x = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    host_format = latent_formats.Wan21()
    expected_in, expected_out = host_format.process_in(x), host_format.process_out(x)
    with SimulatedDevice() as host_mode:
        host_format.process_out(on_device(x))
    assert host_mode.copies_from_cpu >= 1  # what the test catches
    with SimulatedDevice() as mode:
        with devices.tensor_attributes_on(host_format, DEVICE):
            moved_copies = mode.copies_from_cpu
            out = host_format.process_out(on_device(x))
        decoder = type("Decoder", (), {"latent_channels": 16})()
        model_space = tiny_vae.to_model_space(decoder, on_device(x))  # a cached instance with its tensors on the device
        model_space = tiny_vae.to_model_space(decoder, on_device(x))
        assert mode.copies_from_cpu == moved_copies + 2  # the move itself (mean and std), once; then none per call
    assert torch.equal(values(out), expected_out) and torch.equal(values(model_space), expected_in)
    assert host_format.latents_mean.device.type == "cpu"  # restored
