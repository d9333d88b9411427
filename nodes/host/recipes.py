"""A student's recipe travelling with its MODEL, and the recipe turned into host objects.

The recipe lives in the ModelPatcher's `model_options` (which `clone()` copies), not on the shared
BaseModel, so a LoRA loader can give its output a new recipe without changing the input MODEL.
"""

from __future__ import annotations

import math

import comfy.model_sampling
import comfy.samplers
import torch

from ...fastgen_core import sampling
from ...fastgen_core.recipe import Recipe

RECIPE_OPTION = "fastgen_recipe"
SOURCE_OPTION = "fastgen_source"  # the file a MODEL was loaded from by our loaders (a DMD teacher's name)

# Host model-config class name prefixes -> the family names recipes use.
_HOST_FAMILIES = (
    ("FastGenDigits", "fastgen-digits"),
    ("SDXL", "sdxl"), ("SSD1B", "sdxl"), ("Segmind_Vega", "sdxl"), ("KOALA", "sdxl"),
    ("SD15", "sd15"), ("SD20", "sd2"), ("SD21", "sd2"),
    ("FluxSchnell", "flux"), ("Flux", "flux"),
    ("WAN22", "wan2.2"), ("WAN21", "wan2.1"),
    ("QwenImage", "qwen-image"), ("SD3", "sd3"), ("Chroma", "chroma"),
)


def model_recipe(model) -> Recipe | None:
    return model.model_options.get(RECIPE_OPTION)


def with_recipe(model, recipe: Recipe | None):
    patched = model.clone()
    if recipe is None:
        patched.model_options.pop(RECIPE_OPTION, None)
    else:
        patched.model_options[RECIPE_OPTION] = recipe
    return patched


def with_source(model, name: str):
    model.model_options[SOURCE_OPTION] = name
    return model


def model_name(model) -> str:
    """The file our loaders loaded the MODEL from, else the host's model class (stock loaders keep no name)."""
    return model.model_options.get(SOURCE_OPTION) or type(model.model.model_config).__name__


def host_family(model) -> str:
    name = type(model.model.model_config).__name__
    return next((family for prefix, family in _HOST_FAMILIES if name.startswith(prefix)), name.lower())


def host_alpha(model_sampling):
    """alpha(sigma) of a host model: the weight of x0 in the host's own noise scaling, on sigma's
    device (the sampler's sigmas are on the GPU there)."""

    def alpha(sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
        return model_sampling.noise_scaling(sigma, sigma.new_zeros(1), sigma.new_ones(1)).reshape(())

    return alpha


def host_timestep_to_sigma(model_sampling, timestep: float) -> torch.Tensor:
    """Sigma for a timestep in the usual 0..1000 training convention, through the model's own
    model_sampling: discrete (eps / v) models index their sigma table; flow models scale t / 1000
    by their `multiplier` (1000 for Wan / SD3, 1 for Chroma and our embedded models); Flux-style
    samplings take t / 1000 directly."""
    t = torch.tensor(float(timestep))
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return model_sampling.sigma(t)
    return model_sampling.sigma(t / sampling.NUM_TRAIN_TIMESTEPS * getattr(model_sampling, "multiplier", 1.0))


def apply_recipe_shift(model, recipe: Recipe):
    """The model with the recipe's flow shift, if it differs from the model's own.

    DiscreteFlow samplings (Wan, SD3, our models) take the shift as ModelSamplingSD3 sets it;
    Flux-type samplings (FLUX, Qwen-Image) shift exponentially, sigma = e^mu / (e^mu + 1/t - 1),
    which is the same curve as the linear shift s at mu = log(s).
    """
    model_sampling = model.get_model_object("model_sampling")
    if recipe.prediction != "flow" or recipe.shift is None:
        return model
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        base, current, wanted = comfy.model_sampling.ModelSamplingDiscreteFlow, float(model_sampling.shift), recipe.shift
    elif isinstance(model_sampling, comfy.model_sampling.ModelSamplingFlux):
        base, current, wanted = comfy.model_sampling.ModelSamplingFlux, float(model_sampling.shift), math.log(recipe.shift)
    else:
        return model
    if abs(current - wanted) < 1e-6:
        return model

    class RecipeFlowSampling(base, comfy.model_sampling.CONST):
        pass

    shifted = RecipeFlowSampling(model.model.model_config)
    if base is comfy.model_sampling.ModelSamplingFlux:
        shifted.set_parameters(shift=wanted)
    else:
        shifted.set_parameters(shift=wanted, multiplier=model_sampling.multiplier)
    patched = model.clone()
    patched.add_object_patch("model_sampling", shifted)
    return patched


def recipe_sigmas(model_sampling, recipe: Recipe, steps: int | None = None, scheduler: str | None = None) -> torch.Tensor:
    """The recipe's noise levels (steps + 1 values ending in 0).

    The student's own timesteps / sigmas when the step count is the recipe's; otherwise `steps`
    spaced by the recipe's scheduler (the host's "simple" when it names none).
    """
    steps = steps or recipe.steps
    if steps == recipe.steps and scheduler is None:
        if recipe.sigmas is not None:
            return torch.tensor([*recipe.sigmas, 0.0], dtype=torch.float32)
        if recipe.timesteps is not None:
            return sampling.sigmas_from_timesteps(recipe.timesteps, lambda t: host_timestep_to_sigma(model_sampling, t))
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler or recipe.scheduler or "simple", steps).float()


def describe(recipe: Recipe | None) -> str:
    if recipe is None:
        return "no recipe"
    parts = [f"{recipe.family} {recipe.method}", f"{recipe.steps} steps"]
    if recipe.timesteps is not None:
        parts.append("timesteps " + ",".join(str(t) for t in recipe.timesteps))
    elif recipe.sigmas is not None:
        parts.append("sigmas " + ",".join(f"{s:g}" for s in recipe.sigmas))
    elif recipe.scheduler:
        parts.append(f"scheduler {recipe.scheduler}")
    parts.append(f"sampler {recipe.sampler}" + (f" (gamma {recipe.gamma:g})" if recipe.gamma is not None else ""))
    parts.append(f"cfg {recipe.cfg:g}")
    if recipe.prediction == "flow" and recipe.shift is not None:
        parts.append(f"shift {recipe.shift:g}")
    if recipe.extra.get("flux_guidance") is not None:
        parts.append(f"FluxGuidance {recipe.extra['flux_guidance']:g}")
    if recipe.lora_strength is not None:
        parts.append(f"LoRA strength {recipe.lora_strength:g}")
    return ", ".join(parts)
