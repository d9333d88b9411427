"""Distilled students as native MODELs that carry their recipe, and a KSampler that honours it.

FastGen Load Student   diffusion_models file (safetensors, weights-only .pth, diffusers layout)
                       -> MODEL + recipe (file metadata, else the table of known public students)
FastGen Load Student LoRA   MODEL + LoRA (comfy / PEFT / kohya keys) -> MODEL + recipe
FastGen Student KSampler    MODEL + conditioning + latent + seed -> LATENT, sampled by the recipe

Everything heavy is the host's own: its model detection and diffusers converters
(`comfy.sd.load_diffusion_model_state_dict`), its LoRA key maps and patching, its samplers and
schedulers; fastgen_core reads files, knows recipes and checks that a LoRA fits.
"""

from __future__ import annotations

import logging
import os

import comfy.lora
import comfy.lora_convert
import comfy.model_detection
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io, ui

from ..fastgen_core import checkpoint, students
from ..fastgen_core.recipe import RECIPE_KEY, Recipe, families_compatible, lookup_recipe
from .host import file_dtypes, inputs
from .host.embedded import load_digit_model
from .host.model_files import embedded_models, resolve_model_path
from .host.recipes import describe, host_family, model_recipe, recipe_sigmas, with_recipe, with_source
from .host.samplers import METHODS, NO_RECIPE_HELP, SAMPLER_CHOICES, SCHEDULER_CHOICES, plan_sampling, recipe_sampler, warn

log = logging.getLogger("fastgen")

def _find_recipe(path: str, metadata: dict, keys, family: str | None, kind: str) -> tuple[Recipe | None, str]:
    """The recipe for a student file and where it came from: metadata > sidecar > known-students table."""
    recipe, note = lookup_recipe(path, metadata, keys=keys, family=family, kind=kind)
    if recipe is None:
        name = os.path.basename(path)
        note = f"no recipe found: {name} has no {RECIPE_KEY} metadata or sidecar and is not a known public student. {NO_RECIPE_HELP}"
    return recipe, note


def student_files() -> list[str]:
    extensions = students.SAFETENSORS_EXTENSIONS + students.PICKLE_EXTENSIONS
    names = [n for n in folder_paths.get_filename_list("diffusion_models") if n.lower().endswith(extensions)]
    return embedded_models() + names


def load_student(path: str):
    """(MODEL, recipe, note) for a student file: FastGen networks natively, the rest through the host."""
    try:
        arch = checkpoint.network_info(path)[0]
    except (OSError, ValueError):
        arch = None
    if arch == "DigitDiT":
        model = load_digit_model(path)
        recipe = model_recipe(model)
        return model, recipe, "from the file's metadata" if recipe else f"no recipe in {os.path.basename(path)}. {NO_RECIPE_HELP}"

    student = students.load_student_file(path)
    name = os.path.basename(path)
    if students.lora_format(student.state_dict):
        raise ValueError(f"{name} is a LoRA, not a full model: load its base model and apply it with FastGen Load Student LoRA.")
    keys = list(student.state_dict)
    layout = students.diffusers_layout(student.state_dict)
    state_dict = student.state_dict
    if layout == "transformer" and students.guess_family(keys) == "wan":
        state_dict = students.wan_diffusers_to_native(state_dict)  # ComfyUI has no converter for this one
    dtypes = file_dtypes.of(state_dict, comfy.model_detection.unet_prefix_from_state_dict(state_dict))
    model = comfy.sd.load_diffusion_model_state_dict(state_dict)
    if model is None:
        family = students.guess_family(keys) or "an unknown architecture"
        hint = f" It is in the diffusers {layout} layout, which this ComfyUI cannot convert for that family." if layout else ""
        raise ValueError(f"ComfyUI does not recognise the model in {name} (its keys look like {family}, e.g. '{keys[0]}').{hint}")
    file_dtypes.remember(model.model, dtypes)
    recipe, note = _find_recipe(path, student.metadata, keys, host_family(model), "model")
    return model, recipe, note


class FastGenLoadStudent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenLoadStudent",
            display_name="FastGen Load Student",
            category="FastGen/load",
            description="Loads a distilled student (any model family ComfyUI runs) from models/diffusion_models as a "
            "native MODEL carrying its sampling recipe: from the file's fastgen.recipe metadata, or from the table of "
            "known public students (DMD2, SDXL-Lightning, FLUX schnell, ...).",
            inputs=[
                io.Combo.Input("student_name", options=student_files(),
                               tooltip="safetensors (preferred), or a .pth/.pt/.ckpt/.bin that holds only tensors (FastGen "
                               "training checkpoints included; pickles that need code are refused). Diffusers-layout UNets "
                               "are converted by ComfyUI."),
            ],
            outputs=[
                io.Model.Output(tooltip="The student as a native MODEL; its recipe travels with it to the Student KSampler."),
                io.String.Output(display_name="recipe", tooltip="The recipe found (or why none was found), as text."),
            ],
        )

    @classmethod
    def execute(cls, student_name: str) -> io.NodeOutput:
        model, recipe, note = load_student(resolve_model_path(student_name))
        text = f"{describe(recipe)}\n{note}"
        return io.NodeOutput(with_source(with_recipe(model, recipe), student_name), text, ui=ui.PreviewText(text))


class FastGenLoadStudentLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenLoadStudentLoRA",
            display_name="FastGen Load Student LoRA",
            category="FastGen/load",
            description="Applies a distillation LoRA (lightx2v / CausVid for Wan, DMD2 / Hyper-SD / Lightning for SDXL, "
            "AYF for FLUX, ...) to its base MODEL and attaches the student's recipe. Reads the comfy, PEFT and kohya "
            "key formats; a LoRA for another architecture or size is refused with the reason.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the LoRA was distilled from."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file in models/loras (safetensors, or a .pth holding only tensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength. Some students document another strength (Hyper-SD FLUX: 0.125); "
                               "the node says so when this differs."),
            ],
            outputs=[
                io.Model.Output(tooltip="The patched MODEL, carrying the student's recipe."),
                io.String.Output(display_name="recipe", tooltip="The recipe found (or why none was found), as text."),
            ],
        )

    @classmethod
    def validate_inputs(cls, strength: float = 1.0):
        return inputs.widget_problem(cls, strength=strength) or True

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        student = students.load_student_file(path)
        if students.lora_format(student.state_dict) is None:
            raise ValueError(f"{lora_name} is not a LoRA (no lora_up/lora_down or lora_A/lora_B weights); "
                             "load full students with FastGen Load Student.")
        lora = comfy.lora_convert.convert_lora(student.state_dict)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        weights = model.model.state_dict()
        accepted = {name: tuple(weights[key].shape) if isinstance(key, str) and key in weights else None for name, key in key_map.items()}
        family = host_family(model)
        missing = students.check_lora_fits(lora, accepted, lora_name=lora_name, model_name=f"this {family} model", model_family=family)

        messages = []
        if missing:
            warn(messages, f"{len(missing)} of the LoRA's layers are not in this model and were skipped (e.g. {missing[0]})")
        patched = model.clone()
        patched.add_patches(comfy.lora.load_lora(lora, key_map, log_missing=False), strength)

        recipe, note = _find_recipe(path, student.metadata, list(lora), family, "lora")
        if recipe is None:
            recipe = model_recipe(model)  # a style LoRA on a student keeps the student's recipe
            if recipe is not None:
                note = "the LoRA has no recipe; kept the input model's"
        if recipe is not None and not families_compatible(recipe.family, family):
            warn(messages, f"the recipe is for {recipe.family}, but the model is {family}")
        if recipe is not None and recipe.lora_strength is not None and abs(recipe.lora_strength - strength) > 1e-6:
            warn(messages, f"the student's authors use strength {recipe.lora_strength:g}; this node has {strength:g}")
        text = "\n".join([describe(recipe), note, *messages])
        return io.NodeOutput(with_recipe(patched, recipe), text, ui=ui.PreviewText(text))


class FastGenStudentSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenStudentSampler",
            display_name="FastGen Student KSampler",
            category="FastGen/sampling",
            description="One-node sampling by the student's recipe: its steps, timesteps, shift, cfg and sampler, from "
            "the MODEL a FastGen loader returned. Any setting left at 'recipe' / 0 follows the recipe; overrides that "
            "hurt a distilled student (CFG on a CFG-distilled model, other step counts) are applied with a warning.",
            inputs=[
                io.Model.Input("model", tooltip="A MODEL from FastGen Load Student / Load Student LoRA / Load Model."),
                io.Conditioning.Input("positive", tooltip="What to generate."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Only used when cfg > 1; distilled students usually run at cfg 1 without it."),
                io.Latent.Input("latent_image", tooltip="The latent to start from (Empty Latent Image for text-to-image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed: the same seed and settings give the same image."),
                io.Int.Input("steps", default=0, min=0, max=200, tooltip="0 = the recipe's step count."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="0 = the recipe's guidance (1 for CFG-distilled students: no negative pass)."),
                io.Combo.Input("sampler", options=SAMPLER_CHOICES, default="recipe",
                               tooltip="recipe = the student's sampler. FastGen methods: "
                               + "; ".join(f"{k}: {v}" for k, v in METHODS.items())),
                io.Combo.Input("scheduler", options=SCHEDULER_CHOICES, default="recipe",
                               tooltip="recipe = the student's own timesteps (or its scheduler); "
                               "another scheduler spaces the steps itself."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Below 1: keep only the last part of the schedule (image-to-image)."),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, sampler: str = "recipe", scheduler: str = "recipe", cfg: float = 0.0, denoise: float = 1.0):
        return inputs.widget_problem(cls, sampler=sampler, scheduler=scheduler, cfg=cfg, denoise=denoise) or True

    @classmethod
    def execute(cls, model, positive, latent_image, seed: int, steps: int, cfg: float, sampler: str, scheduler: str,
                denoise: float, negative=None) -> io.NodeOutput:
        if denoise <= 0.0:
            return io.NodeOutput(latent_image)
        model, recipe, steps, cfg, sampler_name, scheduler_name, messages = plan_sampling(model, steps, cfg, sampler, scheduler)
        if negative is None:
            if cfg > 1.0:
                raise ValueError(f"cfg {cfg:g} needs a negative conditioning: connect one, or use cfg 1")
            negative = positive  # never evaluated: the host skips the unconditional pass at cfg 1

        sigmas = recipe_sigmas(model.get_model_object("model_sampling"), recipe, steps, scheduler_name)
        if denoise < 1.0:
            keep = max(1, round((len(sigmas) - 1) * denoise))
            sigmas = sigmas[-(keep + 1):]

        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        out = comfy.sample.sample_custom(
            model, noise, cfg, recipe_sampler(sampler_name, recipe), sigmas, positive, negative, samples,
            noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        latent["samples"] = out
        used = f"{len(sigmas) - 1} steps, cfg {cfg:g}, {sampler_name}, sigmas " + ", ".join(f"{float(s):.3g}" for s in sigmas)
        return io.NodeOutput(latent, ui=ui.PreviewText("\n".join([used, *messages])))
