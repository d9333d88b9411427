"""Samplers and schedules over `denoiser(x, sigma) -> x0`, in the style of k-diffusion.

Flow / CONST convention: x_sigma = sigma * noise + (1 - sigma) * x0, sigma from 1 (noise) to 0.
"""

from __future__ import annotations

import torch


def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """`steps + 1` sigmas from 1 to 0, uniform in t and shifted as the host's DiscreteFlow does:
    sigma = shift * t / (1 + (shift - 1) * t)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


def to_d(x, sigma, denoised):
    """The ODE derivative dx/dsigma from a denoised estimate."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, callback=None):
    """First-order Euler steps along the probability-flow ODE (the teachers' reference sampler)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x
