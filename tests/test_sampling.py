"""Samplers against exact answers: for Gaussian data x0 ~ N(0, s^2 I) the ideal denoiser and the
probability-flow ODE's solution are known in closed form, for flow (alpha = 1 - sigma) and
k-diffusion (alpha = 1) parametrizations alike."""

import pytest
import torch

from fastgen_core import sampling
from fastgen_core.sampling import flow_alpha, ve_alpha

DATA_STD = 0.5
ALPHAS = {"flow": (flow_alpha, sampling.flow_sigmas), "ve": (ve_alpha, lambda n: torch.linspace(14.6, 0.03, n).tolist() + [0.0])}


def gaussian_denoiser(alpha):
    """E[x0 | x] for x = alpha x0 + sigma n, x0 ~ N(0, s^2)."""

    def denoise(x, sigma):
        a = alpha(torch.as_tensor(sigma))
        return a * DATA_STD**2 * x / (a**2 * DATA_STD**2 + sigma**2)

    return denoise


def exact_ode(x, sigma_from, sigma_to, alpha):
    """The probability-flow ODE maps x(sigma) proportionally to the marginal std."""

    def std(s):
        s = torch.as_tensor(s)
        return (alpha(s) ** 2 * DATA_STD**2 + s**2).sqrt()

    return x * std(sigma_to) / std(sigma_from)


def schedule(kind, steps):
    alpha, make = ALPHAS[kind]
    if kind == "flow":
        return torch.cat([make(steps)[:-1].clamp(max=0.999), torch.zeros(1)])  # start just below 1
    return torch.tensor(make(steps))


SECOND_ORDER = {
    "dpmpp_2m": lambda denoiser, x, sigmas, alpha: sampling.sample_dpmpp_2m(denoiser, x, sigmas, alpha=alpha),
    "ab2": lambda denoiser, x, sigmas, alpha: sampling.sample_ab2(denoiser, x, sigmas),
}


@pytest.mark.parametrize("solver", SECOND_ORDER)
@pytest.mark.parametrize("kind", ["flow", "ve"])
def test_second_order_solvers_beat_euler_at_the_same_steps(kind, solver):
    alpha = ALPHAS[kind][0]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (4, 8):
        sigmas = schedule(kind, steps)
        x_start = x * float(sigmas[0])  # any start works: the map is linear
        target = exact_ode(x_start, sigmas[0], sigmas[-2], alpha)
        denoiser = gaussian_denoiser(alpha)
        # compare at the last non-zero sigma, where the ODE is still smooth
        euler = sampling.sample_euler(denoiser, x_start, sigmas[:-1])
        dpm = SECOND_ORDER[solver](denoiser, x_start, sigmas[:-1], alpha)
        errors[steps] = ((euler - target).norm().item(), (dpm - target).norm().item())
        assert errors[steps][1] < errors[steps][0], (kind, steps, errors[steps])
    # second order: from 4 to 8 steps its error falls faster than Euler's
    assert errors[8][1] / errors[4][1] < errors[8][0] / errors[4][0], errors


def test_flow_solvers_start_at_pure_noise():
    """Host flow schedules start at sigma = 1 exactly (alpha = 0): no NaN, and the first step is
    the exact jump, so DPM++(2M) still tracks the exact solution."""
    sigmas = sampling.flow_sigmas(8)
    x = torch.randn(2048, generator=torch.Generator().manual_seed(8))
    target = exact_ode(x, sigmas[0], sigmas[-2], flow_alpha)
    for sample in (sampling.sample_euler, sampling.sample_dpmpp_2m, sampling.sample_ab2):
        out = sample(gaussian_denoiser(flow_alpha), x, sigmas[:-1])
        assert torch.isfinite(out).all()
    dpm = sampling.sample_dpmpp_2m(gaussian_denoiser(flow_alpha), x, sigmas[:-1])
    ab2 = sampling.sample_ab2(gaussian_denoiser(flow_alpha), x, sigmas[:-1])
    euler = sampling.sample_euler(gaussian_denoiser(flow_alpha), x, sigmas[:-1])
    assert (dpm - target).norm() < (euler - target).norm()
    assert (ab2 - target).norm() < (euler - target).norm()


def test_ab2_converges_at_second_order():
    """Halving the step size divides AB2's error by about 4 (Euler's by about 2), from sigma = 1."""
    x = torch.randn(2048, generator=torch.Generator().manual_seed(3))
    errors = {}
    for steps in (16, 32, 64):
        sigmas = torch.linspace(1.0, 0.05, steps + 1)  # a fixed interval, so only the step size changes
        target = exact_ode(x, sigmas[0], sigmas[-1], flow_alpha)
        ab2 = sampling.sample_ab2(gaussian_denoiser(flow_alpha), x, sigmas)
        euler = sampling.sample_euler(gaussian_denoiser(flow_alpha), x, sigmas)
        errors[steps] = ((ab2 - target).norm().item(), (euler - target).norm().item())
    for coarse, fine in ((16, 32), (32, 64)):
        assert 3.5 < errors[coarse][0] / errors[fine][0] < 4.5, errors
        assert 1.8 < errors[coarse][1] / errors[fine][1] < 2.2, errors


POINT = 0.7  # a point-mass data distribution: the ideal denoiser returns it for every x


def point_denoiser(x, sigma):
    return torch.full_like(x, POINT)


@pytest.mark.parametrize("kind", ["flow", "ve"])
def test_multistep_ode_is_the_exact_ddim_jump_and_deterministic(kind):
    """For a single data point the ODE path is x(s) = alpha(s) c + s n with n fixed: the DDIM /
    flow-map jump with the predicted noise lands on it exactly, at every step."""
    alpha = ALPHAS[kind][0]
    sigmas = schedule(kind, 4)
    n = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    x = alpha(sigmas[0]) * POINT + sigmas[0] * n
    seen = []
    out = sampling.sample_multistep(point_denoiser, x, sigmas[:-1], noise="ode", alpha=alpha, callback=lambda d: seen.append(d["x"]))
    for i, xi in enumerate(seen):
        torch.testing.assert_close(xi, alpha(sigmas[i + 1]) * POINT + sigmas[i + 1] * n, rtol=1e-4, atol=1e-4)
    assert torch.equal(out, sampling.sample_multistep(point_denoiser, x, sigmas[:-1], noise="ode", alpha=alpha))


@pytest.mark.parametrize("method", ["multistep", "tcd"])
@pytest.mark.parametrize("kind", ["flow", "ve"])
def test_renoising_puts_samples_at_the_right_noise_level(kind, method):
    """Fresh-noise re-noising must give x = alpha(s') c + s' z at every step (a wrong alpha, e.g.
    VE re-noising on a flow model, shows up as a wrong mean or std)."""
    alpha = ALPHAS[kind][0]
    sigmas = schedule(kind, 4)
    x = alpha(sigmas[0]) * POINT + sigmas[0] * torch.randn(20000, generator=torch.Generator().manual_seed(2))
    seen = []
    kwargs = {"noise": "sde"} if method == "multistep" else {"gamma": 0.6}
    sample = getattr(sampling, f"sample_{method}")
    out = sample(point_denoiser, x, sigmas, generator=torch.Generator().manual_seed(3), alpha=alpha,
                 callback=lambda d: seen.append(d["x"]), **kwargs)
    for i, xi in enumerate(seen[:-1]):
        s = float(sigmas[i + 1])
        assert xi.mean().item() == pytest.approx(float(alpha(sigmas[i + 1])) * POINT, abs=0.03 * max(s, 0.1))
        assert xi.std().item() == pytest.approx(s, rel=0.03)
    assert torch.allclose(out, torch.full_like(out, POINT))


def test_sde_noise_depends_on_the_generator_only():
    denoiser = gaussian_denoiser(flow_alpha)
    x = torch.randn(256, generator=torch.Generator().manual_seed(2))
    sigmas = sampling.flow_sigmas(4)

    def run(seed):
        return sampling.sample_multistep(denoiser, x, sigmas, noise="sde", generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


@pytest.mark.parametrize("kind", ["flow", "ve"])
def test_tcd_gamma_one_is_lcm_and_gamma_zero_is_ddim(kind):
    alpha = ALPHAS[kind][0]
    denoiser = gaussian_denoiser(alpha)
    sigmas = schedule(kind, 4)
    x = torch.randn(256, generator=torch.Generator().manual_seed(5)) * float(sigmas[0])

    def gen():
        return torch.Generator().manual_seed(9)

    lcm = sampling.sample_multistep(denoiser, x, sigmas, noise="sde", generator=gen(), alpha=alpha)
    tcd1 = sampling.sample_tcd(denoiser, x, sigmas, gamma=1.0, generator=gen(), alpha=alpha)
    torch.testing.assert_close(tcd1, lcm)
    ddim = sampling.sample_multistep(denoiser, x, sigmas, noise="ode", alpha=alpha)
    tcd0 = sampling.sample_tcd(denoiser, x, sigmas, gamma=0.0, generator=gen(), alpha=alpha)
    torch.testing.assert_close(tcd0, ddim)
    mid = sampling.sample_tcd(denoiser, x, sigmas, gamma=0.5, generator=gen(), alpha=alpha)
    assert not torch.allclose(mid, lcm) and not torch.allclose(mid, ddim)


def test_timestep_lists_are_parsed_and_validated():
    assert sampling.parse_timesteps("999, 749,499 249") == [999, 749, 499, 249]
    for bad, message in [("", "empty"), ("999, abc", "not a list"), ("249, 999", "decrease"), ("1200", "0..1000")]:
        with pytest.raises(ValueError, match=message):
            sampling.parse_timesteps(bad)


def test_flow_timesteps_become_shifted_sigmas_for_numbers_and_tensors():
    assert sampling.flow_timestep_to_sigma(999) == 0.999 and sampling.flow_timestep_to_sigma(250, shift=3.0) == 0.5
    t = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    torch.testing.assert_close(sampling.flow_timestep_to_sigma(t, shift=3.0), 3 * (t / 1000) / (1 + 2 * (t / 1000)))
    torch.testing.assert_close(sampling.sigmas_from_timesteps([999, 500], sampling.flow_timestep_to_sigma), torch.tensor([0.999, 0.5, 0.0]))


def test_flow_sigmas_match_the_hosts_shift_formula():
    sigmas = sampling.flow_sigmas(4, shift=3.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(sigmas, 3 * t / (1 + 2 * t))
    with pytest.raises(ValueError):
        sampling.flow_sigmas(0)
