"""DMD2 distillation on modelopt.torch.fastgen, with one shared copy of the teacher's weights.

modelopt's DMDPipeline holds three models (student, teacher, fake score) and computes the DMD2
losses; its `create_fake_score` deep-copies the teacher. Here the student and the fake score are
two LoRA adapters on one frozen copy of the teacher, and the teacher is the same base with both
adapters off: three `AdapterView`s over one network, each switching its adapter on for its own
call. The pipeline sees three modules; memory holds one base (plus two small LoRAs).

    switch, adapters = attach_lora(net, ("student", "fake"), rank=16)
    trainer = DMDTrainer(net, switch, adapters, DistillSettings(steps=4), conditions)
    trainer.run(iterations)

LoRAs are written in ComfyUI's key format (`diffusion_model.<module>.lora_up/lora_down/alpha`)
with the student's recipe in the metadata, so ComfyUI's LoraLoader and ours load them.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path
from .recipe import RECIPE_KEY, Recipe
from .sampling import NUM_TRAIN_TIMESTEPS

STUDENT, FAKE = "student", "fake"


class AdapterSwitch:
    """Which LoRA adapter the shared network runs with (None: the bare teacher)."""

    def __init__(self):
        self.active: str | None = None

    @contextmanager
    def use(self, name: str | None):
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class LoRAAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None, generator=None):
        super().__init__()
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)  # starts as the teacher

    def forward(self, x):
        # The adapter's weights stay fp32 (the optimizer's master copy) while the host computes in
        # fp16 / bf16 on a GPU: run it in the activations' dtype as autocast would, but in fp32 for
        # fp16 activations, whose range would underflow small LoRA gradients.
        compute = torch.float32 if x.dtype == torch.float16 else x.dtype
        h = F.linear(x.to(compute), self.down.weight.to(compute))
        return (F.linear(h, self.up.weight.to(compute)) * (self.alpha / self.rank)).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The change to the patched weight, (alpha / rank) * up @ down (what merging adds)."""
        return (self.up.weight @ self.down.weight) * (self.alpha / self.rank)


class LoRALinear(nn.Module):
    """A frozen Linear plus named LoRA adapters, of which the switch enables at most one."""

    def __init__(self, base: nn.Linear, switch: AdapterSwitch, names, rank: int, generator=None):
        super().__init__()
        self.base, self.switch = base, switch
        self.adapters = nn.ModuleDict({
            name: LoRAAdapter(base.in_features, base.out_features, rank, generator=generator) for name in names
        })

    def forward(self, x):
        out = self.base(x)
        adapter = self.adapters[self.switch.active] if self.switch.active in self.adapters else None
        return out if adapter is None else out + adapter(x).to(out.dtype)


def default_targets(name: str, module: nn.Module) -> bool:
    """Attention and MLP projections of the transformer blocks (the DiT's bulk of weights)."""
    return isinstance(module, nn.Linear) and ".blocks." in f".{name}" and name.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")


def attach_lora(net: nn.Module, names=(STUDENT, FAKE), rank: int = 16, targets=default_targets, seed: int = 0):
    """Freeze `net` and give each targeted Linear one LoRA adapter per name (initialised from
    `seed`, so the same call gives the same adapters). Returns the switch and
    {name: {module path: LoRAAdapter}}."""
    net.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    switch = AdapterSwitch()
    adapters = {name: {} for name in names}
    for path, module in list(net.named_modules()):
        if not targets(path, module):
            continue
        wrapped = LoRALinear(module, switch, names, rank, generator).to(device=module.weight.device)
        parent_path, _, child = path.rpartition(".")
        setattr(net.get_submodule(parent_path) if parent_path else net, child, wrapped)
        for name in names:
            adapters[name][path] = wrapped.adapters[name]
    if not any(adapters[names[0]]):
        raise ValueError(f"no layer of {type(net).__name__} matched the LoRA targets")
    return switch, adapters


def detach_lora(net: nn.Module) -> nn.Module:
    """Put the original Linear layers back (undoes `attach_lora`; the adapters are dropped)."""
    for path, module in list(net.named_modules()):
        if isinstance(module, LoRALinear):
            parent_path, _, child = path.rpartition(".")
            setattr(net.get_submodule(parent_path) if parent_path else net, child, module.base)
    return net


BLOCK_LISTS = ("blocks", "transformer_blocks", "double_blocks", "single_blocks", "input_blocks", "output_blocks")


def enable_gradient_checkpointing(net: nn.Module, switch: AdapterSwitch) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them (memory
    for time). Returns the number of blocks. The recomputation runs after the forward's adapter
    context has closed, so each checkpointed call re-enters the adapter that was active when it ran:
    without that, the backward would recompute the bare teacher and train nothing."""
    count = 0
    for name, module in net.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
            for block in module:
                _checkpoint_block(block, switch)
                count += 1
    if not count:
        raise ValueError(f"{type(net).__name__} has no block list ({', '.join(BLOCK_LISTS)}) to checkpoint")
    return count


def _checkpoint_block(block: nn.Module, switch: AdapterSwitch):
    forward = block.forward

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        active = switch.active

        def run(*a, **k):
            with switch.use(active):
                return forward(*a, **k)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

    checkpointed.fastgen_checkpoint = True
    block.forward = checkpointed  # an instance attribute: nn.Module.__call__ picks it up


def disable_gradient_checkpointing(net: nn.Module):
    for module in net.modules():
        if getattr(module.__dict__.get("forward"), "fastgen_checkpoint", False):
            del module.forward


class AdapterView(nn.Module):
    """One of the three models DMDPipeline calls: the shared network with one adapter enabled.

    Only the adapter's own parameters are registered here (the base is held without registering
    it), so `view.parameters()` is exactly what its optimizer trains and the pipeline's
    `teacher.requires_grad_(False)` touches nothing shared.
    """

    def __init__(self, net: nn.Module, switch: AdapterSwitch, adapter: str | None, lora: dict | None = None):
        super().__init__()
        object.__setattr__(self, "_net", net)
        self.switch, self.adapter = switch, adapter
        self.lora = nn.ModuleList(list((lora or {}).values()))

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, **kwargs):
        with self.switch.use(self.adapter):
            return self._net(hidden_states, timestep, encoder_hidden_states, **kwargs)


def attach_discriminator(net: nn.Module, switch: AdapterSwitch, teacher: nn.Module, grid: tuple[int, int]):
    """DMD2's GAN head (modelopt's Discriminator_ImageDiT) on the teacher's middle-block tokens.

    modelopt reads the teacher's features from `teacher._fastgen_captured`; the network is shared,
    so the hook records a block's output only while no adapter is on (the teacher's own calls).
    Tokens [B, N, D] become the [B, D, H, W] maps the head expects (N = H * W, row-major patches).
    """
    from modelopt.torch.fastgen.discriminators import Discriminator_ImageDiT

    blocks = next((m for name, m in net.named_modules()
                   if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS), None)
    if blocks is None:
        raise ValueError(f"{type(net).__name__} has no block list ({', '.join(BLOCK_LISTS)}) to take GAN features from")
    captured = []
    object.__setattr__(teacher, "_fastgen_captured", captured)
    height, width = grid

    def capture(module, args, output):
        # (a checkpointed block's recompute calls its forward directly: this hook does not fire twice)
        if switch.active is None:
            tokens = output[0] if isinstance(output, tuple) else output
            b, n, d = tokens.shape
            if n != height * width:
                raise ValueError(f"teacher features have {n} tokens, not the {height}x{width} grid given")
            # the head trains in fp32; a GPU host runs the teacher in fp16 / bf16
            captured.append(tokens.transpose(1, 2).reshape(b, d, height, width).float())

    block = blocks[len(blocks) // 2]
    hook = block.register_forward_hook(capture)  # removed by DMDTrainer.close()
    head = Discriminator_ImageDiT(feature_indices={0}, num_blocks=1, inner_dim=_block_width(block))
    return head.to(next(net.parameters()).device), hook


def _block_width(block: nn.Module) -> int:
    """A transformer block's token width: the input size of its first Linear."""
    first = next(m for m in block.modules() if isinstance(m, (nn.Linear, LoRALinear)))
    return (first.base if isinstance(first, LoRALinear) else first).in_features


def lora_state_dict(adapters: dict, prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """One adapter set in ComfyUI's LoRA key format (alpha stored, so strength 1 = as trained)."""
    out = {}
    for path, adapter in adapters.items():
        key = f"{prefix}{path}"
        out[f"{key}.lora_down.weight"] = adapter.down.weight.detach().float().cpu().contiguous()
        out[f"{key}.lora_up.weight"] = adapter.up.weight.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(adapter.alpha)
    return out


def save_lora(path: str, adapters: dict, recipe: Recipe | None = None, dtype=torch.float16):
    """Write a LoRA atomically: a crash mid-write never leaves a partial file under `path`."""
    tensors = {k: (v.to(dtype) if v.ndim else v) for k, v in lora_state_dict(adapters).items()}
    metadata = {RECIPE_KEY: recipe.to_json()} if recipe is not None else {}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@dataclass
class DistillSettings:
    steps: int = 4  # student sampling steps
    timesteps: list[float] | None = None  # student noise levels in (0, 1], default evenly spaced from 0.999
    guidance: float = 3.0  # teacher CFG inside the DMD loss
    student_update_freq: int = 5  # fake-score updates per student update (DMD2's TTUR)
    lr: float = 1e-4
    fake_lr: float = 1e-4
    batch: int = 16
    grad_clip: float = 1.0
    seed: int = 0
    time_dist: str = "logitnormal"
    t_range: tuple = (0.001, 0.999)  # RF times the fake score and the DMD loss draw from (an eps
    # teacher's noise levels end at its sigma_max, which is t = sigma_max / (1 + sigma_max) < 1)
    pred_type: str = "flow"  # what the wrapped network returns: "flow" (velocity) or "x0"
    sample_shape: tuple = (3, 32, 32)  # one sample, without the batch dimension
    ema_decay: float = 0.0  # > 0: keep an EMA of the student LoRA (modelopt's tracker) and save it
    gan_weight: float = 0.0  # > 0: DMD2's GAN term (needs real data): a discriminator head on teacher features
    gan_r1_weight: float = 0.0  # approximate R1 regularisation of the discriminator (DMD2: 100-1000 when used)

    def t_list(self) -> list[float]:
        if self.timesteps is not None:
            if len(self.timesteps) != self.steps:
                raise ValueError(f"{len(self.timesteps)} student timesteps for {self.steps} steps")
            return [float(t) for t in self.timesteps] + [0.0]
        return [0.999] + [1.0 - i / self.steps for i in range(1, self.steps)] + [0.0]


class NonFiniteLoss(RuntimeError):
    pass


class DMDTrainer:
    """DMD2 on one shared network: fake-score update every iteration, student every
    `student_update_freq`, multi-step students by backward simulation (no real data needed).

    `conditions(batch, generator) -> (positive, negative)` draws the conditioning each iteration.
    `fake_score` replaces the fake-score LoRA by a module of the caller's (e.g. modelopt's
    deep-copied `create_fake_score(teacher)`, which the benchmark compares against); it is trained
    in full and checkpointed as a state dict.
    """

    def __init__(self, net: nn.Module, switch: AdapterSwitch, adapters: dict, settings: DistillSettings, conditions,
                 fake_score: nn.Module | None = None, real_data=None, feature_grid: tuple[int, int] | None = None):
        from modelopt.torch.fastgen import DMDConfig, DMDPipeline, EMAConfig  # ~5 s import: only when training

        self.net, self.switch, self.adapters, self.settings, self.conditions = net, switch, adapters, settings, conditions
        config = DMDConfig(
            pred_type=settings.pred_type,
            guidance_scale=settings.guidance,
            student_sample_steps=settings.steps,
            student_sample_type="sde",
            backward_simulation=settings.steps > 1,
            student_update_freq=settings.student_update_freq,
            sample_t_cfg={"time_dist_type": settings.time_dist, "min_t": settings.t_range[0], "max_t": settings.t_range[1],
                          "t_list": settings.t_list() if settings.steps > 1 else None},
            ema=EMAConfig(decay=settings.ema_decay, type="constant") if settings.ema_decay > 0 else None,
            gan_loss_weight_gen=settings.gan_weight,
            gan_r1_reg_weight=settings.gan_r1_weight,
        )
        self.student = AdapterView(net, switch, STUDENT, adapters[STUDENT])
        self.fake_score = fake_score if fake_score is not None else AdapterView(net, switch, FAKE, adapters[FAKE])
        self.teacher = AdapterView(net, switch, None)
        self.real_data, self.discriminator, self.disc_opt, self._gan_hook = real_data, None, None, None
        if settings.gan_weight > 0:
            torch.manual_seed(settings.seed)  # the head's initial weights: the same for every trainer of this seed
            if real_data is None or feature_grid is None:
                raise ValueError("gan_weight > 0 needs real data (real_data) and the token grid of the teacher's features "
                                 "(feature_grid); DMD2's GAN compares generated samples with real ones")
            self.discriminator, self._gan_hook = attach_discriminator(net, switch, self.teacher, feature_grid)
            self.disc_opt = torch.optim.AdamW(self.discriminator.parameters(), lr=settings.fake_lr, betas=(0.0, 0.999),
                                              weight_decay=0.0)
        self.pipeline = DMDPipeline(self.student, self.teacher, self.fake_score, config, discriminator=self.discriminator)
        self.student_opt = torch.optim.AdamW(self.student.parameters(), lr=settings.lr, betas=(0.0, 0.999), weight_decay=0.0)
        self.fake_opt = torch.optim.AdamW(self.fake_score.parameters(), lr=settings.fake_lr, betas=(0.0, 0.999), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(settings.seed)
        torch.manual_seed(settings.seed)  # modelopt draws timesteps and noise from the global RNG
        self.iteration = 0
        self.saved_iteration: int | None = None  # the iteration of the last training state on disk
        self.history: list[dict] = []

    def _step(self, optimizer, params, loss: torch.Tensor, what: str):
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{what} loss became {loss.item()} at iteration {self.iteration}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip)
        optimizer.step()

    def train_step(self) -> dict:
        s = self.settings
        positive, negative = self.conditions(s.batch, self.generator)
        shape = self.sample_shape(s.batch)
        noise = torch.randn(shape, generator=self.generator).to(self.device)
        latents = torch.zeros_like(noise)  # backward simulation: the student makes its own inputs
        record = {"iteration": self.iteration}
        fake = self.pipeline.compute_fake_score_loss(latents, noise, positive)["total"]
        self._step(self.fake_opt, list(self.fake_score.parameters()), fake, "fake-score")
        record["fake_score"] = fake.item()
        if self.discriminator is not None:
            real, real_positive = self.real_data(s.batch, self.generator)
            disc = self.pipeline.compute_discriminator_loss(real.to(self.device), noise, real_positive)["total"]
            self._step(self.disc_opt, list(self.discriminator.parameters()), disc, "discriminator")
            record["discriminator"] = disc.item()
        if self.iteration % s.student_update_freq == 0:
            losses = self.pipeline.compute_student_loss(latents, noise, positive, negative_encoder_hidden_states=negative)
            self._step(self.student_opt, list(self.student.parameters()), losses["total"], "student")
            self.pipeline.update_ema(iteration=self.iteration)
            record["vsd"] = losses["vsd"].item()
            if "gan_gen" in losses:
                record["gan_gen"] = losses["gan_gen"].item()
        self.iteration += 1
        self.history.append(record)
        return record

    def close(self):
        """Remove the GAN feature hook from the shared network (nothing else is attached by the trainer)."""
        if self._gan_hook is not None:
            self._gan_hook.remove()
            self._gan_hook = None

    @property
    def device(self):
        return next(iter(self.adapters[STUDENT].values())).up.weight.device

    def sample_shape(self, batch: int):
        return (batch, *self.settings.sample_shape)

    # -------------------------------------------------------------- checkpoints and resume

    def state(self) -> dict:
        return {
            "iteration": self.iteration,
            "student": lora_state_dict(self.adapters[STUDENT]),
            "fake": lora_state_dict(self.adapters[FAKE]) if FAKE in self.adapters else self.fake_score.state_dict(),
            "student_opt": self.student_opt.state_dict(),
            "fake_opt": self.fake_opt.state_dict(),
            "rng": torch.get_rng_state(),
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
            "ema": self.pipeline.ema.state_dict() if self.pipeline.ema is not None else {},
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else {},
            "disc_opt": self.disc_opt.state_dict() if self.disc_opt is not None else {},
        }

    def save_checkpoint(self, path: str):
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)
        self.saved_iteration = self.iteration

    def load_checkpoint(self, path: str, state: dict | None = None):
        """Continue from a saved training state (`state`: the file already read by `read_checkpoint`).
        The state is checked against these adapters first: a run saved at another rank or for
        another model is refused with the reason, not a tensor-size error halfway through."""
        state = read_checkpoint(path) if state is None else state
        rank = next(iter(self.adapters[STUDENT].values())).rank
        check_checkpoint_rank(state, rank, path)
        for name, key in ((STUDENT, "student"), (FAKE, "fake")):
            _check_checkpoint_layers(state[key], self.adapters.get(name, {}), path, key)
        if FAKE not in self.adapters:
            self.fake_score.load_state_dict(state["fake"])
        for name, key in ((STUDENT, "student"), (FAKE, "fake")):
            for module_path, adapter in self.adapters.get(name, {}).items():
                prefix = f"diffusion_model.{module_path}"
                adapter.down.weight.data.copy_(state[key][f"{prefix}.lora_down.weight"])
                adapter.up.weight.data.copy_(state[key][f"{prefix}.lora_up.weight"])
        self.student_opt.load_state_dict(state["student_opt"])
        self.fake_opt.load_state_dict(state["fake_opt"])
        # the optimizer states carry the learning rates of the saved run: this run's settings win
        for optimizer, lr in ((self.student_opt, self.settings.lr), (self.fake_opt, self.settings.fake_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr
        torch.set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])
        self.iteration = self.saved_iteration = int(state["iteration"])
        self.history = list(state["history"])
        if self.pipeline.ema is not None and state.get("ema"):
            self.pipeline.ema.load_state_dict(state["ema"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def publish_ema(self):
        """Put the EMA weights into the student LoRA (after the last checkpoint: the saved live
        weights still resume exactly). No-op without EMA or before its first update."""
        ema = self.pipeline.ema
        if ema is not None and ema._initialized:
            ema.copy_to(self.student)

    def run(self, iterations: int, checkpoint_path: str | None = None, checkpoint_every: int = 0,
            callback=None, should_stop=None) -> str:
        """Train until `iterations` in total; returns "done", "stopped" or raises NonFiniteLoss.

        A checkpoint is written every `checkpoint_every` iterations and when stopped, so a
        cancelled or interrupted run resumes where it was (`load_checkpoint`)."""
        while self.iteration < iterations:
            if should_stop is not None and should_stop():
                if checkpoint_path:
                    self.save_checkpoint(checkpoint_path)
                return "stopped"
            record = self.train_step()
            if callback is not None:
                callback(record)
            if checkpoint_path and checkpoint_every and self.iteration % checkpoint_every == 0:
                self.save_checkpoint(checkpoint_path)
        if checkpoint_path:
            self.save_checkpoint(checkpoint_path)
        return "done"


def student_recipe(settings: DistillSettings, family: str, teacher: str | None, shift: float | None = 1.0,
                   as_sigmas: bool = False, prediction: str = "flow", timesteps: list[float] | None = None) -> Recipe:
    """The recipe a DMD student is sampled with: its own noise levels, re-noised with fresh noise.

    The students are trained at RF times t. For flow models these are the sigmas themselves: as
    timesteps (t * 1000) they are exact only under shift 1 (the embedded models); for a host model
    with its own shift (Wan: 8) the recipe stores the sigmas instead, which no shift changes.
    Discrete (eps / v) students store the host timesteps they were trained at (`timesteps`): their
    sigma table has no shift, and the loaders convert timesteps through it exactly.
    """
    t_list = settings.t_list()[:-1]
    common = dict(family=family, prediction=prediction, steps=settings.steps, cfg=1.0, sampler="multistep_sde",
                  method="dmd2", teacher=teacher)
    if timesteps is not None:
        return Recipe(**common, timesteps=[round(float(t)) for t in timesteps], shift=None)
    if as_sigmas:
        return Recipe(**common, sigmas=[float(t) for t in t_list], shift=None)
    return Recipe(**common, timesteps=[round(t * NUM_TRAIN_TIMESTEPS) for t in t_list], shift=shift)


CHECKPOINT_KEYS = ("iteration", "student", "fake", "student_opt", "fake_opt", "rng", "generator", "history")


def read_checkpoint(path: str) -> dict:
    """A training state `DMDTrainer.save_checkpoint` wrote (tensors only: nothing in it runs code),
    or a ValueError naming the file when it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises several kinds for damaged or foreign files
        raise ValueError(f"{path} is not a readable FastGen training state (damaged or cut short?): "
                         f"{str(err).splitlines()[0]}") from None
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing or not isinstance(state["student"], dict) or not state["student"]:
        raise ValueError(f"{path} is not a FastGen DMD training state (it lacks {', '.join(missing) or 'student LoRA weights'})")
    iteration, history = state["iteration"], state["history"]
    # one loss record per iteration done: the loop trusts the count, the loss chart the records
    if (not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0 or not isinstance(history, list)
            or len(history) != iteration or not all(isinstance(r, dict) and isinstance(r.get("fake_score"), float) for r in history)):
        raise ValueError(f"{path}: its iteration count and loss history do not agree (a damaged or edited training state)")
    return state


def checkpoint_rank(state: dict) -> int:
    """The LoRA rank a saved run trained at (the first student layer's down-projection rows)."""
    key = next(k for k in state["student"] if k.endswith(".lora_down.weight"))
    return int(state["student"][key].shape[0])


def check_checkpoint_rank(state: dict, rank: int, path: str):
    trained = checkpoint_rank(state)
    if trained != rank:
        raise ValueError(f"{path} was trained at lora_rank {trained} (stopped at iteration {int(state['iteration'])}), "
                         f"and this run asks for rank {rank}: set lora_rank to {trained} to resume it, or turn resume "
                         f"off and choose another save_name to start a new run at rank {rank}")


def _check_checkpoint_layers(saved: dict, adapters: dict, path: str, what: str):
    """Every adapter has its weights in the saved state, at its own size."""
    for module_path, adapter in adapters.items():
        prefix = f"diffusion_model.{module_path}"
        for suffix, weight in ((".lora_down.weight", adapter.down.weight), (".lora_up.weight", adapter.up.weight)):
            found = saved.get(prefix + suffix)
            if found is None:
                raise ValueError(f"{path} was saved for another model: its {what} LoRA has no weights for the layer "
                                 f"{module_path}; resume with the teacher it was trained on, or turn resume off")
            if tuple(found.shape) != tuple(weight.shape):
                raise ValueError(f"{path} was saved for another model: its {what} LoRA's {module_path}{suffix} is "
                                 f"{list(found.shape)}, this model's is {list(weight.shape)}; resume with the teacher "
                                 "it was trained on, or turn resume off")


RESUME_SUFFIX = ".fastgen-resume"  # not a model extension: the host's LoRA lists do not show it
LEGACY_RESUME_SUFFIX = ".resume.pt"  # before 2026-12-04; listed as a LoRA by the host


def default_checkpoint_path(lora_path: str) -> str:
    """The training state kept beside a LoRA for resuming; a state saved under the old name is
    moved to the new one (out of the host's LoRA lists)."""
    stem = os.path.splitext(lora_path)[0]
    path, legacy = stem + RESUME_SUFFIX, stem + LEGACY_RESUME_SUFFIX
    if not os.path.exists(path) and os.path.isfile(legacy):
        os.replace(legacy, path)
    return path
