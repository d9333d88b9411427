"""Few-step samplers as the host's SAMPLER, and the plan of one sampling run from a MODEL's recipe
and a node's overrides."""

from __future__ import annotations

import logging

import comfy.samplers
import torch

from ...fastgen_core import sampling
from ...fastgen_core.recipe import Recipe, families_compatible
from . import inputs
from .recipes import apply_recipe_shift, host_alpha, host_family, model_recipe

log = logging.getLogger("fastgen")

NO_RECIPE_HELP = (
    "Choose the settings its model card gives: typically 4-8 steps, cfg 1 (distilled students do not use CFG), "
    "sampler multistep_sde (DMD2 / LCM) or euler (rectified-flow students), and the student's shift."
)



METHODS = {
    "multistep_sde": "DMD2 / LCM / consistency students: predict x0, re-noise with fresh noise",
    "multistep_ode": "DDIM / flow-map jump: re-noise with the predicted noise (deterministic)",
    "tcd": "TCD: partial re-noising with gamma (1 = LCM, 0 = DDIM)",
    "ab2": "AB2 for teachers: second-order multistep in sigma, one model call per step (best at 8-16 steps here)",
    "dpmpp_2m": "DPM-Solver++(2M) for teachers: second-order multistep in log-SNR",
    "euler": "Euler for teachers (the reference first-order ODE solver)",
}


def sampler_function(method: str, gamma: float):
    if method not in METHODS:
        raise ValueError(f"unknown few-step method {method!r}; choose one of {sorted(METHODS)}")

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        model_sampling = model.inner_model.inner_model.model_sampling
        alpha = host_alpha(model_sampling)
        s_in = x.new_ones([x.shape[0]])

        def denoiser(x, sigma):
            return model(x, sigma * s_in, **extra_args)

        seed = extra_args.get("seed")
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        if method == "euler":
            return sampling.sample_euler(denoiser, x, sigmas, callback=callback)
        if method == "ab2":
            return sampling.sample_ab2(denoiser, x, sigmas, callback=callback)
        if method == "dpmpp_2m":
            return sampling.sample_dpmpp_2m(denoiser, x, sigmas, callback=callback, alpha=alpha)
        if method == "tcd":
            def sigma_at(sigma, fraction):
                # the ends exactly: discrete models' timestep() rounds to a table index
                if fraction <= 0:
                    return 0.0
                if fraction >= 1:
                    return sigma
                return model_sampling.sigma(model_sampling.timestep(sigma.reshape(1)) * fraction).reshape(())

            return sampling.sample_tcd(denoiser, x, sigmas, gamma=gamma, generator=generator, callback=callback,
                                       alpha=alpha, sigma_at=sigma_at)
        noise = "sde" if method == "multistep_sde" else "ode"
        return sampling.sample_multistep(denoiser, x, sigmas, noise=noise, generator=generator, callback=callback, alpha=alpha)

    return sample



def warn(messages: list[str], text: str):
    log.warning("FastGen: %s", text)
    messages.append("warning: " + text)



SAMPLER_CHOICES = ["recipe", *METHODS, *[n for n in comfy.samplers.SAMPLER_NAMES if n not in METHODS]]
SCHEDULER_CHOICES = ["recipe", *comfy.samplers.SCHEDULER_NAMES]


def recipe_sampler(name: str, recipe: Recipe | None):
    if name in METHODS:
        gamma = recipe.gamma if recipe is not None and recipe.gamma is not None else 0.3
        return comfy.samplers.KSAMPLER(sampler_function(name, gamma))
    if name in comfy.samplers.SAMPLER_NAMES:
        return comfy.samplers.sampler_object(name)
    raise ValueError(f"the student's recipe names sampler {name!r}, which neither FastGen nor this ComfyUI has: set the "
                     f"node's sampler input to one of {inputs.choices_text(SAMPLER_CHOICES[1:])}")


def check_choices(sampler: str, scheduler: str):
    """The node's own sampler / scheduler values (a linked or API-sent value can be anything): a
    bad one is the node's input's fault, not the recipe's."""
    for name, value, choices in (("sampler", sampler, SAMPLER_CHOICES), ("scheduler", scheduler, SCHEDULER_CHOICES)):
        if value not in choices:
            raise ValueError(f"the node's {name} input {value!r} is not one of its choices: {inputs.choices_text(choices)}")


def plan_sampling(model, steps: int, cfg: float, sampler: str, scheduler: str):
    """Settings for one run: the recipe's, with the node's overrides, and warnings for bad overrides."""
    check_choices(sampler, scheduler)
    recipe, messages = model_recipe(model), []
    if recipe is None:
        unset = [name for name, value in (("steps", steps), ("cfg", cfg), ("sampler", sampler)) if value in (0, "recipe")]
        if unset:
            raise ValueError(f"This MODEL carries no recipe, so set {', '.join(unset)} on the node. {NO_RECIPE_HELP}")
        recipe = Recipe(family=host_family(model), prediction="eps", steps=steps, cfg=cfg, sampler=sampler,
                        scheduler=None if scheduler == "recipe" else scheduler, method="manual")
        return model, recipe, steps, cfg, sampler, (None if scheduler == "recipe" else scheduler), messages

    family = host_family(model)
    if not families_compatible(recipe.family, family):
        warn(messages, f"the recipe is for {recipe.family}, but the model is {family}")
    use_steps = steps or recipe.steps
    use_cfg = cfg or recipe.cfg
    use_sampler = recipe.sampler if sampler == "recipe" else sampler
    use_scheduler = None if scheduler == "recipe" else scheduler
    if recipe.cfg <= 1.0 and use_cfg > 1.0:
        warn(messages, f"this student is CFG-distilled (its recipe uses cfg {recipe.cfg:g}); cfg {use_cfg:g} runs the model "
              "twice per step and usually burns or over-saturates the result")
    if use_steps != recipe.steps and (recipe.timesteps or recipe.sigmas):
        warn(messages, f"the student was trained for {recipe.steps} steps at fixed noise levels; {use_steps} steps use the "
              f"'{use_scheduler or recipe.scheduler or 'simple'}' spacing instead, which it never saw")
    if use_sampler != recipe.sampler:
        warn(messages, f"the recipe samples with {recipe.sampler}; {use_sampler} may not match how the student was trained")
    return apply_recipe_shift(model, recipe), recipe, use_steps, use_cfg, use_sampler, use_scheduler, messages
