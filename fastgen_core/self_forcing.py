"""Self-forcing DMD for the causal world model: the few-step student is trained on contexts it
generated itself, chunk by chunk, as it will run in the live loop (Self-Forcing, Huang et al.
2025), with DMD2's losses from `fastgen_core.distill` (modelopt's DMDPipeline, single-copy: the
student and the fake score are two LoRAs on the frozen diffusion-forcing model).

Each iteration: a real first chunk from a game episode (the live session starts from rendered
frames too), then `context_chunks` chunks the student rolls out itself under the episode's actions
(no grad, its own KV cache), then the DMD losses on the next chunk given that self-made context.
A model trained only on true contexts (teacher forcing) never sees its own mistakes; this one does.

    net = checkpoint.load_network(path)            # the diffusion-forcing world model
    trainer, switch, adapters = world_trainer(net, SelfForcingSettings(steps=2))
    trainer.run(300)
    student = merged_student(net, adapters)        # LoRA merged into the weights: a plain model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import data, distill, world
from .recipe import Recipe


class ChunkDenoiser(nn.Module):
    """The world model as DMDPipeline calls it: `hidden_states` = one chunk [B, C, F, H, W] at RF
    time `timestep` [B]; `encoder_hidden_states` = (context frames [B, C, Fc, H, W], actions
    [B, Fc + F]). Returns the chunk's clean frames (x0), the context seen clean under the
    block-causal mask: what the cached rollout computes, in one pass with gradients."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.config = net.config

    def forward(self, hidden_states, timestep, encoder_hidden_states=None):
        context, actions = encoder_hidden_states
        b, _, f = hidden_states.shape[:3]
        fc = context.shape[2]
        if fc % f:
            raise ValueError(f"context of {fc} frames is not whole chunks of {f}")
        x = torch.cat([context.to(hidden_states.dtype), hidden_states], dim=2)
        sigma = torch.cat([torch.zeros(b, fc, device=x.device, dtype=x.dtype),
                           timestep.reshape(-1, 1).to(x.dtype).expand(b, f)], dim=1)
        out = self.net.forward_sequence(x, sigma, actions, chunk_frames=f)
        return out[:, :, fc:]


@dataclass
class SelfForcingSettings:
    steps: int = 2  # student denoising steps per chunk
    chunk_frames: int = 4
    context_chunks: int = 2  # at most this many self-generated chunks before the trained one
    batch: int = 8
    lr: float = 2e-4
    fake_lr: float = 2e-4
    rank: int = 16
    student_update_freq: int = 5
    episodes: int = 128
    seed: int = 0


class SelfForcingContexts:
    """`conditions(batch, generator)` for DMDTrainer: real first chunks, then the student's own
    rollout of 0..context_chunks chunks under the episodes' actions."""

    def __init__(self, net, switch, settings: SelfForcingSettings, schedule: world.ChunkSchedule, seed: int):
        self.net, self.switch, self.settings, self.schedule = net, switch, settings, schedule
        frames_needed = settings.chunk_frames * (settings.context_chunks + 2)
        clips = [data.game_episode(seed + i, frames_needed) for i in range(settings.episodes)]
        self.frames = torch.stack([c[0].transpose(0, 1) for c in clips])  # [N, C, T, H, W]
        self.actions = torch.stack([c[1] for c in clips])
        self.rollouts = 0

    def __call__(self, batch: int, generator: torch.Generator):
        s, f = self.settings, self.settings.chunk_frames
        rows = torch.randint(0, len(self.frames), (batch,), generator=generator)
        generated = int(torch.randint(0, s.context_chunks + 1, (1,), generator=generator))
        device = next(self.net.parameters()).device
        prefix = self.frames[rows, :, :f].to(device)
        actions = self.actions[rows, :f * (generated + 2)].to(device)
        context = [prefix]
        if generated:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            with self.switch.use(distill.STUDENT), torch.no_grad():
                for chunk in world.rollout(self.net, world.KVCache(), chunks=generated, chunk_frames=f,
                                           schedule=self.schedule, actions=actions, batch=batch,
                                           prefix=(prefix, actions[:, :f]), sampler="sde", seed=seed, device=device):
                    context.append(chunk.latents.clamp(-1, 1))
            self.rollouts += 1
        condition = (torch.cat(context, dim=2), actions)
        return condition, None  # no guidance: the world model has no null-action branch to guide against


def student_schedule(settings: distill.DistillSettings) -> world.ChunkSchedule:
    sigmas = [float(t) for t in settings.t_list()]
    return world.ChunkSchedule(sigmas, sigmas)


def world_trainer(net: nn.Module, settings: SelfForcingSettings = SelfForcingSettings()):
    """(DMDTrainer, switch, adapters) for a diffusion-forcing world model predicting x0."""
    if getattr(net.config, "prediction", None) != "x0":
        raise ValueError("self-forcing DMD here expects a world model that predicts x0 (CausalWorldDiTConfig.prediction)")
    switch, adapters = distill.attach_lora(net, rank=settings.rank, seed=settings.seed)
    config = net.config
    dmd = distill.DistillSettings(steps=settings.steps, guidance=None, student_update_freq=settings.student_update_freq,
                                  lr=settings.lr, fake_lr=settings.fake_lr, batch=settings.batch, seed=settings.seed,
                                  pred_type="x0", time_dist="uniform",
                                  sample_shape=(config.in_channels, settings.chunk_frames, config.frame_size, config.frame_size))
    contexts = SelfForcingContexts(net, switch, settings, student_schedule(dmd), seed=settings.seed)
    trainer = distill.DMDTrainer(ChunkDenoiser(net), switch, adapters, dmd, contexts)
    trainer.contexts = contexts
    return trainer, switch, adapters


@torch.no_grad()
def merged_student(net: nn.Module, adapters: dict) -> nn.Module:
    """Fold the student LoRA into the weights and drop both adapters: a plain world model."""
    for path, adapter in adapters[distill.STUDENT].items():
        layer = net.get_submodule(path).base
        layer.weight += adapter.delta_weight().to(layer.weight.dtype)
    distill.detach_lora(net)
    return net.requires_grad_(False).eval()


def student_recipe(settings: SelfForcingSettings, dmd: distill.DistillSettings) -> Recipe:
    t_list = dmd.t_list()[:-1]
    return Recipe(family="fastgen-game", prediction="flow", steps=settings.steps, sampler="multistep_sde", cfg=1.0,
                  sigmas=[float(t) for t in t_list], shift=None, method="self-forcing-dmd",
                  extra={"chunk_frames": settings.chunk_frames})


def distill_world(net: nn.Module, minutes: float | None = None, iterations: int | None = None,
                  settings: SelfForcingSettings = SelfForcingSettings(), log=print, probe=None, probe_every: int = 100):
    """Self-forcing DMD of a diffusion-forcing world model for a wall-clock budget or a number of
    iterations; returns (merged student, recipe, trainer). `probe(student view) -> str` is logged
    every `probe_every` iterations (the student adapter switched on)."""
    import time

    if (minutes is None) == (iterations is None):
        raise ValueError("give exactly one of minutes or iterations")
    trainer, switch, adapters = world_trainer(net, settings)
    start, vsd = time.perf_counter(), float("nan")
    while (iterations is None or trainer.iteration < iterations) and (
            minutes is None or time.perf_counter() - start < minutes * 60):
        record = trainer.train_step()
        vsd = record.get("vsd", vsd)  # the student's loss, from its last update
        i = trainer.iteration
        if i % 20 == 0 or i == 1:
            log(f"self-forcing {i:5d}  fake {record['fake_score']:.4f}  vsd {vsd:.4f}  {time.perf_counter() - start:.0f}s")
        if probe is not None and i % probe_every == 0:
            with switch.use(distill.STUDENT):
                log(f"self-forcing {i:5d}  probe: {probe(net)}")
    log(f"self-forcing DMD: {trainer.iteration} iterations in {time.perf_counter() - start:.0f}s "
        f"({trainer.contexts.rollouts} on self-generated contexts)")
    recipe = student_recipe(settings, trainer.settings)
    return merged_student(net, adapters), recipe, trainer
