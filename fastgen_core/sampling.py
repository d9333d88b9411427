"""Samplers and schedules over `denoiser(x, sigma) -> x0`, in the style of k-diffusion.

Every sampler works in the host's own x-space, where a noisy sample is

    x = alpha(sigma) * x0 + sigma * noise

- flow / CONST models (ComfyUI's flow models and ours): alpha = 1 - sigma, sigma in [0, 1];
- eps and v models in k-diffusion's sigma space (what ComfyUI's KSampler runs): alpha = 1.

`alpha` is passed as a function (default: flow), so the same code re-noises correctly for every
family; the nodes derive it from the model's own `model_sampling`.
"""

from __future__ import annotations

import math

import torch


def flow_alpha(sigma):
    return 1.0 - sigma


def ve_alpha(sigma):
    return torch.ones_like(sigma) if torch.is_tensor(sigma) else 1.0


# --- schedules ------------------------------------------------------------------------------------


NUM_TRAIN_TIMESTEPS = 1000  # timesteps run 0..1000 in every family's training convention and the host's


def flow_shift(t, shift: float = 1.0):
    """The flow sigma at t in [0, 1] under `shift`, as the host's DiscreteFlow samplings compute it:
    sigma = shift * t / (1 + (shift - 1) * t). A Python number gives a float, a tensor a tensor."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """`steps + 1` sigmas from 1 to 0, uniform in t and shifted as the host's DiscreteFlow does."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return flow_shift(torch.linspace(1.0, 0.0, steps + 1), shift)


def parse_timesteps(text: str, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """"999, 749, 499, 249" -> [999.0, 749.0, 499.0, 249.0], strictly decreasing, in range."""
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"timesteps: {text!r} is not a list of numbers like '999, 749, 499, 249'") from None
    if not values:
        raise ValueError("timesteps: the list is empty")
    if any(v < 0 or v > num_train_timesteps for v in values):
        raise ValueError(f"timesteps: every value must be in 0..{num_train_timesteps}, got {values}")
    if any(b >= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"timesteps must decrease strictly (high noise first), got {values}")
    return values


def discrete_sigma_table(linear_start: float = 0.00085, linear_end: float = 0.012,
                         num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The sigma of each training timestep of a DDPM "scaled linear" model (SD1.x/SDXL defaults):
    betas linear in sqrt space, sigma_t = sqrt((1 - alphabar_t) / alphabar_t)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def discrete_timestep_to_sigma(timestep, table: torch.Tensor) -> torch.Tensor:
    """Sigma at a (fractional) timestep, interpolating log-sigma linearly between table entries."""
    t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, len(table) - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_table = table.log()
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def flow_timestep_to_sigma(timestep, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """Sigma of a flow model at timestep t in 0..num_train_timesteps: the shifted t / T. How a flow
    recipe's timesteps become noise levels (the host's DiscreteFlow samplings agree). A Python
    number gives a float, a tensor a tensor."""
    return flow_shift(timestep / num_train_timesteps, shift)


def sigmas_from_timesteps(timesteps, timestep_to_sigma) -> torch.Tensor:
    """Sigmas for an explicit timestep list through the model's own conversion (the host's
    `model_sampling.sigma`), with the final 0 appended."""
    sigmas = [float(timestep_to_sigma(torch.tensor(float(t)))) for t in timesteps]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


# --- helpers -------------------------------------------------------------------------------------


def to_d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE: (x - x0) / sigma for alpha = 1 (k-diffusion) and for
    alpha = 1 - sigma alike (there it is the flow velocity noise - x0)."""
    return (x - denoised) / sigma


def predicted_noise(x, sigma, denoised, alpha=flow_alpha):
    return (x - alpha(sigma) * denoised) / sigma


def cpu_noise(shape, generator, dtype, device) -> torch.Tensor:
    """Noise from a CPU generator (the same samples on any device), copied to `device`. On a GPU the
    copy goes through pinned memory, queued: from pageable memory it would wait for the GPU."""
    noise = torch.randn(shape, generator=generator, dtype=dtype, device="cpu")
    if torch.device(device).type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


def _noise_like(x, generator):
    return cpu_noise(x.shape, generator, x.dtype, x.device)


def _report(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _half_log_snr(a, sigma) -> float:
    """lambda = log(alpha / sigma); -inf at pure noise (alpha = 0, a flow model at sigma = 1), where
    the DPM-Solver update's limit is the exact jump x = sigma' x + alpha' x0."""
    a = float(a)
    return math.log(a / float(sigma)) if a > 0 else -math.inf


# --- teacher solvers ------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, callback=None):
    """First-order Euler steps along the probability-flow ODE (the teachers' reference sampler)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        _report(callback, i, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, callback=None, alpha=flow_alpha):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in the data prediction, written for
    any alpha(sigma) through the half log-SNR lambda = log(alpha / sigma). With alpha = 1 it is
    k-diffusion's sample_dpmpp_2m; with alpha = 1 - sigma it is the same solver in the flow's own
    (alpha, sigma), not an eps-space approximation of it."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            a_next = alpha(sigma_next)
            h = _half_log_snr(a_next, sigma_next) - _half_log_snr(alpha(sigma), sigma)
            if old_denoised is None or math.isinf(h_last):
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - a_next * math.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, sigma, denoised)
    return x


@torch.no_grad()
def sample_ab2(denoiser, x, sigmas, callback=None):
    """Second-order Adams-Bashforth in sigma: one model call per step, like Euler.

    Each step extrapolates the ODE slope d = dx/dsigma linearly from this step's and the previous
    step's evaluations (variable step sizes; k-diffusion's LMS at order 2). Equivalently: Euler plus
    a free trapezoid correction with the slope the next step evaluates anyway. Working in sigma
    rather than in log-SNR matters for flow models: their log-SNR is -inf at sigma = 1 and +inf at
    0, which leaves DPM-Solver++(2M) first-order for its first two steps and its last, while the
    slope in sigma is finite everywhere. The first step (no history) and the last (onto the data,
    where the x0 prediction is final) are Euler steps.
    """
    d_prev = h_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = to_d(x, sigma, denoised)
        h = sigma_next - sigma
        if d_prev is None or sigma_next == 0:
            x_next = x + d * h
        else:
            ratio = h / (2 * h_prev)
            x_next = x + ((1 + ratio) * d - ratio * d_prev) * h
        _report(callback, i, x_next, sigma, denoised)
        d_prev, h_prev, x = d, h, x_next
    return x


# --- few-step student samplers --------------------------------------------------------------------


@torch.no_grad()
def sample_tcd(denoiser, x, sigmas, gamma=0.3, generator=None, callback=None, alpha=flow_alpha, sigma_at=None):
    """Trajectory-consistent sampling (TCD, Zheng et al. 2024) with stochasticity gamma in [0, 1].

    Each step jumps deterministically (DDIM with the predicted noise) to an intermediate level s,
    the noise level at timestep (1 - gamma) * t_next, then diffuses forward from s to the next sigma
    with fresh noise. gamma = 1 jumps to x0 and re-noises fully: LCM's sampler; gamma = 0 is
    deterministic DDIM. `sigma_at(sigma_next, fraction)` gives the intermediate sigma; by default
    the timestep is proportional to sigma (flow models); the nodes pass the model's own mapping.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    sigma_at = sigma_at or (lambda s, fraction: s * fraction)
    # the step decisions from one host copy of the schedule (one transfer): comparing the GPU's sigmas
    # (or drawn amounts) in Python would wait for the GPU at every step
    levels = sigmas.cpu().tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if levels[i + 1] == 0:
            x = denoised
        else:
            eps = predicted_noise(x, sigma, denoised, alpha)
            sigma_s = torch.as_tensor(sigma_at(sigma_next, 1.0 - gamma), dtype=torch.float32)
            x_s = alpha(sigma_s) * denoised + sigma_s * eps
            # forward diffusion from s to sigma_next: scale by the alpha ratio, add the missing variance
            ratio = alpha(sigma_next) / alpha(sigma_s)
            x = ratio * x_s
            if gamma > 0:  # gamma = 0 lands on sigma_next already: no noise to add (or to draw)
                fresh = (sigma_next**2 - (ratio * sigma_s) ** 2).clamp(min=0).sqrt()
                x = x + fresh * _noise_like(x, generator)
        _report(callback, i, x, sigma, denoised)
    return x


def sample_multistep(denoiser, x, sigmas, noise="sde", generator=None, callback=None, alpha=flow_alpha):
    """DMD / consistency-style multistep sampling: predict x0 at each sigma, then re-noise it to the
    next sigma, x = alpha(s') * x0 + s' * n, with

    - noise="sde": fresh Gaussian noise n (DMD2's default, multistep consistency models);
    - noise="ode": the noise the model implies, n = (x - alpha(s) x0) / s (a deterministic DDIM /
      flow-map jump: the same output for the same initial noise).

    These are TCD's two ends, gamma = 1 and gamma = 0, so that one loop serves all three.
    """
    if noise not in ("sde", "ode"):
        raise ValueError(f"noise must be 'sde' or 'ode', got {noise!r}")
    return sample_tcd(denoiser, x, sigmas, gamma=1.0 if noise == "sde" else 0.0, generator=generator, callback=callback, alpha=alpha)
