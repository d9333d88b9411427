"""Few-step samplers and schedules as native SAMPLER / SIGMAS, for every model family the host runs.

The samplers live in fastgen_core.sampling and work in the host's own x-space through
alpha(sigma); here alpha comes from the model's own `model_sampling.noise_scaling`
(alpha = noise_scaling(sigma, noise=0, x0=1): 1 - sigma for flow models, 1 for eps / v), so the
same SAMPLER re-noises correctly on Wan, Flux, SDXL and our embedded models.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..fastgen_core import sampling
from .host import inputs
from .host.recipes import host_timestep_to_sigma, model_recipe, recipe_sigmas
from .host.samplers import METHODS, sampler_function


class FastGenSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenSampler",
            display_name="FastGen Few-Step Sampler",
            category="FastGen/sampling",
            description="Samplers for distilled students (DMD2, LCM/TCD, consistency / flow-map) and a fast solver "
            "for teachers, as a SAMPLER for SamplerCustom / SamplerCustomAdvanced. Correct for flow, eps and v models.",
            inputs=[
                io.Combo.Input("method", options=list(METHODS), default="multistep_sde",
                               tooltip="; ".join(f"{k}: {v}" for k, v in METHODS.items())),
                io.Float.Input("gamma", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="tcd only: how much fresh noise each step adds (1 = LCM, 0 = deterministic DDIM)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def validate_inputs(cls, method: str = "multistep_sde", gamma: float = 0.3):
        return inputs.widget_problem(cls, method=method, gamma=gamma) or True

    @classmethod
    def execute(cls, method: str, gamma: float) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sampler_function(method, gamma)))


class FastGenSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenSigmas",
            display_name="FastGen Timestep Sigmas",
            category="FastGen/sampling",
            description="SIGMAS for an explicit timestep list (e.g. a distilled student's 999, 749, 499, 249) or for "
            "the recipe the model was loaded with, converted through the model's own model_sampling "
            "(discrete table or shifted flow).",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule converts the timesteps."),
                io.String.Input("timesteps", default="999, 749, 499, 249",
                                tooltip="Decreasing training timesteps in 0..1000, separated by commas or spaces."),
                # after `timesteps` and optional, so graphs saved before it existed load unchanged
                io.Combo.Input("source", options=["timesteps", "recipe"], default="timesteps", optional=True,
                               tooltip="timesteps: the list above. recipe: the student's own schedule, from the recipe a "
                               "FastGen loader attached to the model (its shift is not applied here: use the Student KSampler "
                               "or ModelSamplingSD3 for that)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, timesteps: str, source: str = "timesteps"):
        problem = inputs.widget_problem(cls, source=source)
        if problem is not None:
            return problem
        if source == "timesteps" and timesteps is not None:
            try:
                sampling.parse_timesteps(timesteps)
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(cls, model, timesteps: str, source: str = "timesteps") -> io.NodeOutput:
        model_sampling = model.get_model_object("model_sampling")
        if source not in ("timesteps", "recipe"):  # a linked value is not seen by validate_inputs
            raise ValueError(f"the node's source input {source!r} is not one of its choices: timesteps, recipe")
        if source == "recipe":
            recipe = model_recipe(model)
            if recipe is None:
                raise ValueError("FastGen Timestep Sigmas: this MODEL carries no recipe (load it with a FastGen loader, "
                                 "or choose source 'timesteps' and type the student's timesteps).")
            return io.NodeOutput(recipe_sigmas(model_sampling, recipe))
        values = sampling.parse_timesteps(timesteps)
        return io.NodeOutput(sampling.sigmas_from_timesteps(values, lambda t: host_timestep_to_sigma(model_sampling, t)))
