"""The core as a GPU runs it: tensors on another device than the CPU. Made on the CPU, they broke
nodes on the first GPU run while every CPU test passed; a simulated device
(tests/simulated_device.py) makes the same mistake fail on a CPU. (Half-precision activations
beside fp32 trainable weights: tests/test_distill.py.)"""

import pytest
import torch

from fastgen_core import checkpoint, sampling, train, world
from tests.simulated_device import DEVICE, SimulatedDevice, on_device, values


def test_the_simulated_device_fails_as_cuda_does_and_allows_what_cuda_allows():
    with SimulatedDevice():
        x = on_device(torch.ones(3))
        with pytest.raises(RuntimeError, match="same device"):
            x * torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([x, torch.ones(1)])
        with pytest.raises(RuntimeError, match="generator"):
            torch.randn(3, generator=torch.Generator(), device=x.device)
        y = x * torch.tensor(2.0) + torch.zeros(1, device=x.device) + torch.ones(3).to(x.device)
        picked = x[torch.tensor([0, 2])]
        assert y.device == DEVICE and picked.device == DEVICE and x.cpu().device.type == "cpu"
    assert torch.equal(values(y), torch.full((3,), 3.0))


def _denoiser(x, sigma):
    return 0.5 * x / (1.0 + sigma)


SAMPLERS = {
    "euler": lambda x, s, g: sampling.sample_euler(_denoiser, x, s),
    "ab2": lambda x, s, g: sampling.sample_ab2(_denoiser, x, s),
    "dpmpp_2m": lambda x, s, g: sampling.sample_dpmpp_2m(_denoiser, x, s),
    "tcd": lambda x, s, g: sampling.sample_tcd(_denoiser, x, s, gamma=0.3, generator=g),
    "multistep_sde": lambda x, s, g: sampling.sample_multistep(_denoiser, x, s, noise="sde", generator=g),
    "multistep_ode": lambda x, s, g: sampling.sample_multistep(_denoiser, x, s, noise="ode", generator=g),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_keep_their_work_on_the_device_of_the_latents(name):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = sampling.flow_sigmas(4, shift=3.0)
    expected = SAMPLERS[name](x, sigmas, torch.Generator().manual_seed(1))
    with SimulatedDevice():
        out = SAMPLERS[name](on_device(x), on_device(sigmas), torch.Generator().manual_seed(1))
        assert out.device == DEVICE
    torch.testing.assert_close(values(out), expected, rtol=1e-6, atol=1e-6)


def test_world_rollout_runs_on_the_device_of_its_model():
    net, recipe = checkpoint.load_network(train.WORLD_STUDENT_PATH)
    schedule = world.ChunkSchedule.for_recipe(recipe)

    def run(model):
        cache = world.KVCache(sink_frames=1, window_frames=4)
        return [c.latents for c in world.rollout(model, cache, chunks=2, chunk_frames=2, schedule=schedule, seed=3)]

    expected = run(net)
    with SimulatedDevice():
        net.to(DEVICE)
        chunks = run(net)
        assert all(c.device == DEVICE for c in chunks)
    for got, want in zip(chunks, expected, strict=True):
        torch.testing.assert_close(values(got), want, rtol=1e-5, atol=1e-5)
