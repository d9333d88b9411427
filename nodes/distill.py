"""FastGen DMD Distill: a teacher MODEL -> a few-step LoRA student, from a graph.

The host's own model computes every prediction (`BaseModel.apply_model` returns x0 for any family),
so DMD sees the teacher exactly as the samplers do. The LoRA adapters are attached to the loaded
diffusion model in place for the run and removed afterwards: no copy of the teacher is made. The
student comes back as an ordinary LoRA patch on a clone of the input MODEL, and as a file in the
host's loras folder (ComfyUI keys + the student's recipe), which LoraLoader and ours load.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..fastgen_core import distill, images, sampling
from .host import inputs, save_paths
from .host.conds import model_conds
from .host.recipes import host_family, host_timestep_to_sigma, model_name, with_recipe
from .host.server import prompt_server

log = logging.getLogger("fastgen")

LOSS_EVENT = "fastgen.distill.loss"
SAVE_EXAMPLE = "fastgen/my_student"


class LossEvents:
    """Each iteration's losses to the page that queued the graph (web/js/distill_chart.js draws them
    live on the node), batched to at most five messages a second. Without a server (the pack loaded
    by a tool, or a prompt without a client) it does nothing."""

    def __init__(self, node_id, iterations: int, interval: float = 0.2):
        self.server = prompt_server()
        self.client = getattr(self.server, "client_id", None)
        self.node_id, self.iterations, self.interval = node_id, iterations, interval
        self.pending, self.last = [], 0.0

    def add(self, record: dict):
        self.pending.append({"iteration": record["iteration"] + 1, "fake_score": record["fake_score"],
                             "vsd": record.get("vsd")})
        if time.monotonic() - self.last >= self.interval:
            self.flush()

    def flush(self):
        if self.pending and self.server is not None and self.client:
            self.server.send_sync(LOSS_EVENT, {"node": self.node_id, "iterations": self.iterations, "records": self.pending},
                                  self.client)
        self.pending, self.last = [], time.monotonic()


class HostDenoiser(torch.nn.Module):
    """The host model in modelopt's rectified-flow convention: x_t = (1 - t) x0 + t eps, output x0.

    Flow (CONST) models use the same convention: their sigma is t. Discrete eps / v models are
    variance-exploding in the host (x = x0 + sigma eps): the same point is x_t / (1 - t) at
    sigma = t / (1 - t). `apply_model` then returns x0 for any family, so DMD sees the teacher
    exactly as the host's samplers do. The conditioning argument is a tensor of row indices into
    `conds` (one dict of model inputs per prompt, built by the host's own `extra_conds`), which
    carries every input a family needs (Wan's context, SDXL's pooled `y`, Flux's guidance).
    Holds the BaseModel without registering it, so the adapter views own only their LoRA weights.
    """

    def __init__(self, base_model, conds: list[dict]):
        super().__init__()
        object.__setattr__(self, "_model", base_model)
        self.conds = conds
        self.flow = isinstance(base_model.model_sampling, comfy.model_sampling.CONST)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        t = timestep.to(hidden_states).reshape(-1)
        x, sigma = hidden_states, t
        if not self.flow:
            keep = (1.0 - t).clamp_min(1e-4).reshape(-1, *[1] * (x.ndim - 1))
            x, sigma = x / keep, t / keep.reshape(-1)
        return self._model.apply_model(x, sigma, **self.model_inputs(encoder_hidden_states))

    def model_inputs(self, rows: torch.Tensor) -> dict:
        picked = [self.conds[int(i)] for i in rows.reshape(-1).tolist()]
        return {key: torch.cat([row[key] for row in picked]) if torch.is_tensor(picked[0][key]) else picked[0][key]
                for key in picked[0]}


def rf_time(model_sampling, sigma: float) -> float:
    """The rectified-flow time of a host sigma (see HostDenoiser)."""
    return sigma if isinstance(model_sampling, comfy.model_sampling.CONST) else sigma / (1.0 + sigma)


def check_teacher(model):
    """DMD needs x0 predictions at any noise level: flow models and discrete eps / v models."""
    model_sampling = model.get_model_object("model_sampling")
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return model_sampling
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(
            model_sampling, comfy.model_sampling.EPS) and not isinstance(model_sampling, comfy.model_sampling.EDM):
        return model_sampling
    raise ValueError(f"FastGen DMD Distill trains flow-matching and discrete eps / v-prediction teachers; this "
                     f"{host_family(model)} model samples with {type(model_sampling).__name__}")


def host_prediction(model_sampling) -> str:
    return "v" if isinstance(model_sampling, comfy.model_sampling.V_PREDICTION) else "eps"


def student_schedule(model_sampling, steps: int, text: str) -> tuple[list[float], list[float]]:
    """The student's timesteps (host convention, 0..1000) and their host sigmas.

    Empty text: evenly spaced from the top of the family's schedule (discrete: 999, 749, 499, 249
    as DMD2 SDXL; flow: 1000, 750, 500, 250 under the model's own shift, as lightx2v's Wan)."""
    length = sampling.NUM_TRAIN_TIMESTEPS
    if text.strip():
        timesteps = sampling.parse_timesteps(text)
    else:
        top = float(length) if isinstance(model_sampling, comfy.model_sampling.CONST) else length - 1.0
        timesteps = [top - i * length / steps for i in range(steps)]
    if len(timesteps) != steps:
        raise ValueError(f"student_timesteps lists {len(timesteps)} timesteps for {steps} student steps")
    if any(b >= a for a, b in zip(timesteps, timesteps[1:], strict=False)) or timesteps[-1] <= 0 or timesteps[0] > length:
        raise ValueError(f"student_timesteps must decrease within (0, {length}], got {text!r}")
    return timesteps, [float(host_timestep_to_sigma(model_sampling, t)) for t in timesteps]


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


def resume_state(checkpoint_path: str, resume: bool, lora_rank: int) -> dict | None:
    """The saved training state to continue (read and checked before any work), or None for a new
    run, which must not silently replace the state of an unfinished one."""
    if not resume:
        if os.path.exists(checkpoint_path):
            raise ValueError(f"{save_paths.shown_path(checkpoint_path)} holds the training state of an earlier run under "
                             "this save_name: turn resume on to continue it, or choose another save_name")
        return None
    if not os.path.isfile(checkpoint_path):
        raise ValueError(f"nothing to resume: {save_paths.shown_path(checkpoint_path)} does not exist")
    with torch.inference_mode(False):  # the host runs nodes in inference mode: its tensors could not be trained on
        state = distill.read_checkpoint(checkpoint_path)
    distill.check_checkpoint_rank(state, lora_rank, save_paths.shown_path(checkpoint_path))
    return state


def stopped_message(lora_path: str, checkpoint_path: str, reached: int, iterations: int) -> str:
    """What a cancelled run kept and how to continue it (the host itself only says 'interrupted')."""
    if os.path.exists(lora_path):
        lora = f"{save_paths.listed_name(lora_path, 'loras')} still holds the LoRA of the earlier, finished run"
    else:
        lora = f"no LoRA was saved as {save_paths.listed_name(lora_path, 'loras')} (an unfinished student never takes the final name)"
    return (f"FastGen DMD Distill cancelled at iteration {reached} of {iterations}: {lora}. The training state of "
            f"iteration {reached} is kept in {save_paths.shown_path(checkpoint_path)}: queue again with resume on "
            "(same save_name and lora_rank) to continue from there.")


@contextmanager
def kept_state_named_on_failure(trainer, checkpoint_path: str, events: LossEvents, iterations: int):
    """A run that fails once it has kept a training state (out of memory, a NaN loss, a full disk
    when saving the LoRA) says which state holds its work and how to continue from it."""
    try:
        yield
    except comfy.model_management.InterruptProcessingException:
        raise
    except Exception as err:
        kept = trainer.saved_iteration
        if kept is None:
            raise
        hint = (f"The training state of iteration {kept} of {iterations} is kept in {save_paths.shown_path(checkpoint_path)}: "
                "fix the cause and queue again with resume on (same save_name and lora_rank)"
                + (" to save the LoRA without training again" if kept >= iterations else " to continue from there")
                + (", with a lower learning_rate" if isinstance(err, distill.NonFiniteLoss) else "") + ".")
        tell_page(events, f"FastGen DMD Distill failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. {hint}")
        oom = comfy.model_management.OOM_EXCEPTION
        if oom is not Exception and isinstance(err, oom):
            raise  # the host's own out-of-memory handling (it unloads models and says so); the log has the hint
        raise RuntimeError(f"{type(err).__name__}: {err}. {hint}") from err


def tell_page(events: LossEvents, text: str):
    """A message for the log and, as the node's progress text, for the page that queued the graph."""
    log.warning("%s", text)
    if events.server is not None and events.client and hasattr(events.server, "send_progress_text"):
        events.server.send_progress_text(text, events.node_id, events.client)


class FastGenDistillDMD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenDistillDMD",
            display_name="FastGen DMD Distill (LoRA student)",
            category="FastGen/train",
            description="Distribution-matching distillation (DMD2, through nvidia-modelopt) of a teacher (flow matching, or "
            "discrete eps / v-prediction) into a few-step LoRA student: the student and the fake score are two LoRAs on the "
            "teacher's own weights. Saves the LoRA (with its recipe) in models/loras when it finishes and returns the student "
            "MODEL; cancelled, it keeps a resumable training state and no LoRA.",
            inputs=[
                io.Model.Input("model", tooltip="The teacher: a flow-matching MODEL (the embedded models, Wan, SD3, Flux) "
                               "or a discrete eps / v-prediction one (SD1.5, SDXL)."),
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
                                "models/loras ('.safetensors' added), written only when the run finishes. An existing file "
                                "is never overwritten unless resuming."),
                io.Boolean.Input("resume", default=False, tooltip="Continue the run saved under save_name: its .fastgen-resume "
                                 "training state beside the LoRA, written every 50 iterations, at the end and when cancelled. "
                                 "A cancelled run saves no LoRA; the node and the log say where its state is and at which "
                                 "iteration it stopped. Resume with the same lora_rank (and teacher)."),
                io.String.Input("student_timesteps", default="", optional=True, tooltip="The student's noise levels as "
                                "timesteps 0..1000 in the model's own schedule, e.g. '999, 749, 499, 249'. Empty: evenly "
                                "spaced from the top (DMD2 SDXL's 999, 749, 499, 249; for flow models 1000, 750, 500, 250 "
                                "under the model's shift)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True, tooltip="Recompute block "
                                 "activations in the backward pass: much less memory for large models and latents, ~30% slower."),
                io.Float.Input("ema_decay", default=0.0, min=0.0, max=0.9999, step=0.001, optional=True, tooltip="> 0: "
                               "save an exponential moving average of the student (e.g. 0.99) instead of its last weights."),
            ],
            outputs=[
                io.Model.Output(display_name="student", tooltip="The teacher with the student LoRA applied, carrying its recipe."),
                io.LoraModel.Output(display_name="lora", tooltip="The student LoRA's weights (ComfyUI keys), for the core "
                                    "'Load LoRA Model' and 'Save LoRA Weights' nodes."),
                io.Image.Output(display_name="loss_chart",
                                tooltip="Fake-score (orange) and student VSD (blue) losses, each scaled to its range."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, save_name: str, learning_rate: float = 1e-4, guidance: float = 3.0, ema_decay: float = 0.0):
        # only the inputs named here: the host checks the others' ranges itself (not with **kwargs)
        problem = inputs.widget_problem(cls, learning_rate=learning_rate, guidance=guidance, ema_decay=ema_decay)
        return problem or save_paths.save_name_problem(save_name, SAVE_EXAMPLE)

    @classmethod
    def execute(cls, model, positive, negative, latent, student_steps, iterations, learning_rate, lora_rank, guidance,
                update_ratio, batch_size, seed, save_name, resume, student_timesteps="", gradient_checkpointing=False,
                ema_decay=0.0) -> io.NodeOutput:
        model_sampling = check_teacher(model)
        timesteps, sigmas = student_schedule(model_sampling, student_steps, student_timesteps)
        lora_path = save_paths.resolve_save_path(save_name, "loras", SAVE_EXAMPLE, resume,
                                                 "choose another save_name, or set resume to continue that run")
        checkpoint_path = distill.default_checkpoint_path(lora_path)
        saved_state = resume_state(checkpoint_path, resume, lora_rank)

        comfy.model_management.load_models_gpu([model])
        base = model.model
        device = comfy.model_management.get_torch_device()
        sample_shape = tuple(latent["samples"].shape[1:])
        flow = isinstance(model_sampling, comfy.model_sampling.CONST)
        t_range = (0.001, 0.999) if flow else (rf_time(model_sampling, float(model_sampling.sigma_min)),
                                               rf_time(model_sampling, float(model_sampling.sigma_max)))
        settings = distill.DistillSettings(steps=student_steps, timesteps=[rf_time(model_sampling, s) for s in sigmas],
                                           guidance=guidance, student_update_freq=update_ratio, lr=learning_rate,
                                           fake_lr=learning_rate, batch=batch_size, seed=seed, pred_type="x0",
                                           t_range=t_range, sample_shape=sample_shape, ema_decay=ema_decay)
        pbar = comfy.utils.ProgressBar(iterations)
        live_chart = LossEvents(cls.hidden.unique_id if cls.hidden else None, iterations)
        previewer = latent_preview.get_previewer(device, base.latent_format)

        with torch.inference_mode(False), torch.enable_grad():
            pos = model_conds(base, positive, "positive", sample_shape, device)
            neg = model_conds(base, negative, "negative", sample_shape, device)

            def conditions(batch, generator):
                rows = torch.randint(0, len(pos), (batch,), generator=generator)
                return rows, torch.full_like(rows, len(pos))  # the first negative row follows the positives

            make_trainable_copyable(base)
            switch, adapters = distill.attach_lora(base.diffusion_model, rank=lora_rank, targets=lora_targets, seed=seed)
            try:
                if gradient_checkpointing:
                    distill.enable_gradient_checkpointing(base.diffusion_model, switch)
                trainer = distill.DMDTrainer(HostDenoiser(base, pos + neg), switch, adapters, settings, conditions)
                if saved_state is not None:
                    trainer.load_checkpoint(checkpoint_path, saved_state)

                cancelled = []

                def report(record):
                    live_chart.add(record)
                    preview = None
                    if previewer is not None and (record["iteration"] % 25 == 0 or record["iteration"] + 1 == iterations):
                        preview = previewer.decode_latent_to_preview_image("JPEG", cls._student_sample(trainer))
                    try:
                        pbar.update_absolute(record["iteration"] + 1, iterations, preview)
                    except comfy.model_management.InterruptProcessingException:
                        # the host's progress hook raises on cancel (and clears the flag): note it, so
                        # the loop stops at its next check and writes the resumable checkpoint first
                        cancelled.append(record["iteration"])

                def should_stop():
                    return bool(cancelled) or comfy.model_management.processing_interrupted()

                with kept_state_named_on_failure(trainer, checkpoint_path, live_chart, iterations):
                    status = trainer.run(iterations, checkpoint_path=checkpoint_path, checkpoint_every=50, callback=report,
                                         should_stop=should_stop)
                    live_chart.flush()
                    if status == "done":  # a stopped run's student is unfinished: it never takes the final name
                        trainer.publish_ema()
                        # flow students keep their sigmas (exact under any shift); discrete ones their timesteps
                        recipe = distill.student_recipe(settings, family=host_family(model), teacher=model_name(model),
                                                        as_sigmas=flow, prediction="flow" if flow else host_prediction(model_sampling),
                                                        timesteps=None if flow else timesteps)
                        distill.save_lora(lora_path, adapters[distill.STUDENT], recipe)
                        lora = {k: v.clone() for k, v in distill.lora_state_dict(adapters[distill.STUDENT]).items()}
                history, reached = trainer.history, trainer.iteration
            finally:
                distill.disable_gradient_checkpointing(base.diffusion_model)
                distill.detach_lora(base.diffusion_model)
        if status == "stopped":
            tell_page(live_chart, stopped_message(lora_path, checkpoint_path, reached, iterations))
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()

        student = model.clone()
        student.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(base, {}), log_missing=False), 1.0)
        chart = images.line_chart({"fake_score": [r["fake_score"] for r in history],
                                   "vsd": [r["vsd"] for r in history if "vsd" in r]})
        text = f"{len(history)} iterations; saved {save_paths.listed_name(lora_path, 'loras')} ({save_paths.shown_path(lora_path)})"
        return io.NodeOutput(with_recipe(student, recipe), lora, chart[None], ui=ui.PreviewText(text))

    @staticmethod
    @torch.no_grad()
    def _student_sample(trainer):
        """The student's current sample for the first prompt at its own noise levels (progress preview)."""
        t_list = torch.tensor(trainer.settings.t_list(), device=trainer.device)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((1, *trainer.settings.sample_shape), generator=generator).to(trainer.device) * t_list[0]
        row = torch.zeros(1, dtype=torch.long)

        def denoiser(x, t):  # the host denoiser works in RF time and returns x0
            return trainer.student(x, t.reshape(1), row)

        return sampling.sample_multistep(denoiser, x, t_list, noise="sde", generator=generator)
