"""FastGen DMD Distill: a teacher MODEL -> a few-step LoRA student, from a graph.

The host's own model computes every prediction (`BaseModel.apply_model` returns x0 for any family),
so DMD sees the teacher exactly as the samplers do. The LoRA adapters are attached to the loaded
diffusion model in place for the run and removed afterwards: no copy of the teacher is made. The
student comes back as an ordinary LoRA patch on a clone of the input MODEL, and as a file in the
host's loras folder (ComfyUI keys + the student's recipe), which LoraLoader and ours load.
"""

from __future__ import annotations

import os

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..fastgen_core import distill, images, sampling
from .adapters.recipes import host_family, with_recipe


class HostDenoiser(torch.nn.Module):
    """The host model in modelopt's calling convention: RF time t is the flow sigma, the output is x0.

    Holds the BaseModel without registering it, so the adapter views own only their LoRA weights.
    """

    def __init__(self, base_model):
        super().__init__()
        object.__setattr__(self, "_model", base_model)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        return self._model.apply_model(hidden_states, timestep.to(hidden_states), c_crossattn=encoder_hidden_states)


def make_trainable_copyable(module: torch.nn.Module):
    """Replace inference-mode tensors (the host loads models under torch.inference_mode) by normal
    ones with the same values: autograd cannot save inference tensors for the backward pass."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and buffer.is_inference():
                sub._buffers[name] = buffer.clone()


def lora_targets(name: str, module: torch.nn.Module) -> bool:
    """Linear layers inside the transformer / UNet blocks (attention and MLP projections)."""
    if not isinstance(module, torch.nn.Linear) or module.in_features < 2:
        return False  # Linear(1, d) timestep layers stay as they are
    return any(part in (f".{name}.") for part in (".blocks.", ".transformer_blocks.", ".double_blocks.", ".single_blocks."))


def resolve_save_path(save_name: str, allow_existing: bool) -> str:
    """A path under the first loras folder; refuses `..`, absolute paths and silent overwrites."""
    name = save_name.strip().replace("\\", "/")
    if not name or os.path.isabs(name) or name.startswith("/") or any(part in ("..", "") for part in name.split("/")):
        raise ValueError(f"save_name {save_name!r} must be a relative name like 'fastgen/my_student' (no '..', no absolute path)")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.abspath(folder_paths.get_folder_paths("loras")[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"save_name {save_name!r} leaves the loras folder")
    if os.path.exists(path) and not allow_existing:
        raise ValueError(f"{name} already exists in {root}: choose another save_name, or set resume to continue that run")
    return path


def conditioning_rows(conditioning, name: str) -> torch.Tensor:
    """The cross-attention tensors of a CONDITIONING, one row per prompt [N, L, D]."""
    rows = [c[0] for c in conditioning]
    if not rows:
        raise ValueError(f"{name} conditioning is empty")
    length = max(r.shape[1] for r in rows)
    if any(r.shape[1] != length for r in rows):
        raise ValueError(f"{name} conditionings have different token lengths; encode them with one text encoder")
    return torch.cat(rows).detach().clone()


class FastGenDistillDMD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenDistillDMD",
            display_name="FastGen DMD Distill (LoRA student)",
            category="FastGen/train",
            description="Distribution-matching distillation (DMD2, through nvidia-modelopt) of a flow-matching teacher "
            "into a few-step LoRA student: the student and the fake score are two LoRAs on the teacher's own weights. "
            "Saves the LoRA (with its recipe) in models/loras and returns the student MODEL.",
            inputs=[
                io.Model.Input("model", tooltip="The teacher (a flow-matching MODEL: the embedded models, Wan, ...)."),
                io.Conditioning.Input("positive", tooltip="The prompts to distill on; each row is one prompt, drawn at random."),
                io.Conditioning.Input("negative", tooltip="The negative / unconditional prompt for the teacher's guidance."),
                io.Latent.Input("latent", tooltip="A latent of the size to train at (only its shape is used)."),
                io.Int.Input("student_steps", default=4, min=1, max=8, tooltip="Sampling steps of the student."),
                io.Int.Input("iterations", default=500, min=1, max=100000, tooltip="Fake-score updates; the student updates "
                             "every update_ratio of them."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-1, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate of both LoRAs."),
                io.Int.Input("lora_rank", default=16, min=1, max=256, tooltip="Rank of the student and fake-score LoRAs."),
                io.Float.Input("guidance", default=3.0, min=1.0, max=20.0, step=0.1, tooltip="The teacher's CFG inside the "
                               "DMD loss; the student learns the guided result and samples at cfg 1."),
                io.Int.Input("update_ratio", default=5, min=1, max=20, tooltip="Fake-score updates per student update (DMD2: 5)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Samples per iteration."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seeds the LoRAs, the prompts drawn and all noise."),
                io.String.Input("save_name", default="fastgen/dmd_student", tooltip="Where the LoRA goes, relative to "
                                "models/loras ('.safetensors' added). An existing file is never overwritten unless resuming."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the run saved under save_name (its .resume.pt "
                                 "checkpoint, written every 50 iterations and when cancelled)."),
            ],
            outputs=[
                io.Model.Output(display_name="student", tooltip="The teacher with the student LoRA applied, carrying its recipe."),
                io.Image.Output(display_name="loss_chart",
                                tooltip="Fake-score (orange) and student VSD (blue) losses, each scaled to its range."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, student_steps, iterations, learning_rate, lora_rank, guidance,
                update_ratio, batch_size, seed, save_name, resume) -> io.NodeOutput:
        if not isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST):
            raise ValueError("FastGen DMD Distill trains flow-matching (CONST) teachers such as Wan, SD3, Flux and the "
                             f"embedded models; this {host_family(model)} model is eps / v-prediction")
        lora_path = resolve_save_path(save_name, allow_existing=resume)
        checkpoint_path = distill.default_checkpoint_path(lora_path)
        if resume and not os.path.isfile(checkpoint_path):
            raise ValueError(f"nothing to resume: {checkpoint_path} does not exist")

        comfy.model_management.load_models_gpu([model])
        base = model.model
        device = comfy.model_management.get_torch_device()
        sample_shape = tuple(latent["samples"].shape[1:])
        settings = distill.DistillSettings(steps=student_steps, guidance=guidance, student_update_freq=update_ratio, lr=learning_rate,
                                           fake_lr=learning_rate, batch=batch_size, seed=seed, pred_type="x0",
                                           sample_shape=sample_shape)
        pbar = comfy.utils.ProgressBar(iterations)
        previewer = latent_preview.get_previewer(device, base.latent_format)

        with torch.inference_mode(False), torch.enable_grad():
            pos, neg = conditioning_rows(positive, "positive").to(device), conditioning_rows(negative, "negative").to(device)

            def conditions(batch, generator):
                rows = torch.randint(0, len(pos), (batch,), generator=generator)
                return pos[rows.to(pos.device)], neg[torch.zeros_like(rows).to(neg.device)]

            make_trainable_copyable(base)
            switch, adapters = distill.attach_lora(base.diffusion_model, rank=lora_rank, targets=lora_targets, seed=seed)
            try:
                trainer = distill.DMDTrainer(HostDenoiser(base), switch, adapters, settings, conditions)
                if resume:
                    trainer.load_checkpoint(checkpoint_path)

                def report(record):
                    preview = None
                    if previewer is not None and (record["iteration"] % 25 == 0 or record["iteration"] + 1 == iterations):
                        preview = previewer.decode_latent_to_preview_image("JPEG", cls._student_sample(trainer, pos[:1]))
                    pbar.update_absolute(record["iteration"] + 1, iterations, preview)

                status = trainer.run(iterations, checkpoint_path=checkpoint_path, checkpoint_every=50, callback=report,
                                     should_stop=comfy.model_management.processing_interrupted)
                recipe = distill.student_recipe(settings, family=host_family(model), teacher=None, as_sigmas=True)
                distill.save_lora(lora_path, adapters[distill.STUDENT], recipe)
                lora = distill.lora_state_dict(adapters[distill.STUDENT])
                history = trainer.history
            finally:
                distill.detach_lora(base.diffusion_model)
        if status == "stopped":
            comfy.model_management.throw_exception_if_processing_interrupted()

        student = model.clone()
        student.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(base, {}), log_missing=False), 1.0)
        chart = images.line_chart({"fake_score": [r["fake_score"] for r in history],
                                   "vsd": [r["vsd"] for r in history if "vsd" in r]})
        text = f"{len(history)} iterations; saved {os.path.relpath(lora_path, folder_paths.get_folder_paths('loras')[0])}"
        return io.NodeOutput(with_recipe(student, recipe), chart[None], ui=ui.PreviewText(text))

    @staticmethod
    @torch.no_grad()
    def _student_sample(trainer, positive_row):
        """The student's current one-prompt sample at its own noise levels (for the progress preview)."""
        sigmas = torch.tensor(trainer.settings.t_list(), device=positive_row.device)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((1, *trainer.settings.sample_shape), generator=generator).to(positive_row.device) * sigmas[0]

        def denoiser(x, sigma):  # the host denoiser returns x0 (pred_type "x0")
            return trainer.student(x, sigma.reshape(1), positive_row)

        return sampling.sample_multistep(denoiser, x, sigmas, noise="sde", generator=generator)
