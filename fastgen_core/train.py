"""Training commands for the embedded models.

    python -m fastgen_core.train classifier            # ~3 min on a 2-core CPU
    python -m fastgen_core.train teacher --minutes 18  # the image teacher, time-bounded
    python -m fastgen_core.train student --student-steps 4 --minutes 10   # DMD2 student of the teacher

The teacher is a rectified-flow DigitDiT: x_t = t * noise + (1 - t) * x0, loss ||v - (noise - x0)||^2,
t from a logit-normal distribution (SD3), 10% of labels dropped to the null class for
classifier-free guidance, EMA weights shipped. With `--minutes` the cosine learning-rate decay
follows elapsed time, so the run anneals properly by its deadline on any machine; with `--steps`
it follows the step count (deterministic for a seed).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import time

import torch
import torch.nn.functional as F

from . import checkpoint, data, networks, world
from . import eval as metrics
from .recipe import Recipe

TEACHER_PATH = os.path.join(metrics.ASSETS, "digit_teacher.safetensors")
TEACHER_RECIPE = Recipe(family="fastgen-digits", prediction="flow", steps=32, sampler="euler", cfg=3.0, shift=1.0, method="teacher")


def flow_matching_loss(net, x0, labels, generator=None):
    # Noise is drawn on the CPU generator and moved, so a seed gives the same run on any device.
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator)).to(x0.device)
    x_t = t.view(-1, 1, 1, 1) * noise + (1 - t.view(-1, 1, 1, 1)) * x0
    v = net(x_t, t, networks.class_conditioning(labels)[:, 0].to(x0.device))
    return F.mse_loss(v, noise - x0)


def fit(net, batch_loss, name: str, minutes: float | None, steps: int | None, lr: float, warmup: int, ema_decay: float,
        log=print, probe=None, probe_every: int = 500):
    """The training loop the embedded models share: AdamW, linear warm-up then cosine decay over a
    time budget (`minutes`) or a step count, gradient clipping, an EMA (returned, on the CPU).
    `batch_loss()` draws a batch and returns its loss; `probe(ema) -> str` is logged every
    `probe_every` steps. Returns (ema, steps done, seconds)."""
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, step = time.time(), 0
    while True:
        progress = (time.time() - start) / (60 * minutes) if steps is None else step / steps
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)
        if step % 100 == 0:
            log(f"{name} step {step:5d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:.0f}s")
        if probe is not None and step % probe_every == 0 and step:
            log(f"{name} step {step:5d}  probe: {probe(ema.eval())}")
        step += 1
    return ema.eval().cpu(), step, time.time() - start


def train_teacher(minutes: float | None = 18.0, steps: int | None = None, batch: int = 32, lr: float = 2e-3,
                  seed: int = 0, config: networks.DigitDiTConfig = networks.DigitDiTConfig(dim=128, depth=6, heads=4),
                  ema_decay: float = 0.999, warmup: int = 200, device: str = "cpu", log=print) -> networks.DigitDiT:
    if (minutes is None) == (steps is None):
        raise ValueError("give exactly one of minutes or steps")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = data.load_mnist("train")
    x_all = data.to_model_space(train.images).to(device)
    net = networks.DigitDiT(config).init_weights(seed).to(device)

    def batch_loss():
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        labels = train.labels[idx].clone()
        labels[torch.rand(batch, generator=gen) < 0.1] = networks.NULL_CLASS
        return flow_matching_loss(net, x_all[idx.to(device)], labels, gen)

    ema, done, seconds = fit(net, batch_loss, "teacher", minutes, steps, lr, warmup, ema_decay, log)
    log(f"teacher trained: {done} steps of {batch} in {seconds:.0f}s")
    return ema


def digit_conditions(batch, generator):
    """Random digits and the unconditional class, as the DMD teacher's CFG needs them."""
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return networks.class_conditioning(labels)[:, 0], networks.class_conditioning([networks.NULL_CLASS] * batch)[:, 0]


def merge_lora(net: networks.DigitDiT, adapters: dict) -> networks.DigitDiT:
    """A plain DigitDiT with the student's LoRA folded into its weights (W + alpha/r * up @ down)."""
    merged = networks.DigitDiT(net.config)
    state = {}
    for key, value in net.state_dict().items():
        if ".adapters." in key:
            continue
        state[key.replace(".base.", ".")] = value.detach().clone()
    for path, adapter in adapters.items():
        state[f"{path}.weight"] = state[f"{path}.weight"] + adapter.delta_weight().detach().to(state[f"{path}.weight"])
    merged.load_state_dict(state)
    return merged.eval().requires_grad_(False)


def real_digit_batches(device: str):
    """Real training digits with their class conditioning, for DMD2's GAN term."""
    train = data.load_mnist("train")
    images = data.to_model_space(train.images)

    def draw(batch, generator):
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        return images[rows].to(device), networks.class_conditioning(train.labels[rows])[:, 0].to(device)

    return draw


def train_student(student_steps: int = 4, minutes: float = 10.0, batch: int = 32, lr: float = 1e-4, rank: int = 32,
                  guidance: float = 3.0, update_freq: int = 5, seed: int = 0, device: str = "cpu", log=print,
                  gan_weight: float = 0.0, iterations: int | None = None):
    """DMD2 (fastgen_core.distill) of the shipped teacher; returns (merged student, recipe, trainer).

    `gan_weight` > 0 adds DMD2's GAN term on real training digits (off by default: the shipped
    students are data-free); `iterations` stops at a count instead of the time budget."""
    from . import distill

    torch.manual_seed(seed)
    net, _ = checkpoint.load_network(TEACHER_PATH, device=device)
    switch, adapters = distill.attach_lora(net, rank=rank, seed=seed)
    settings = distill.DistillSettings(steps=student_steps, guidance=guidance, student_update_freq=update_freq, lr=lr, fake_lr=lr,
                                       batch=batch, seed=seed, gan_weight=gan_weight)
    grid = data.MODEL_SIZE // net.config.patch_size
    trainer = distill.DMDTrainer(net, switch, adapters, settings, lambda b, g: tuple(c.to(device) for c in digit_conditions(b, g)),
                                 real_data=real_digit_batches(device) if gan_weight > 0 else None, feature_grid=(grid, grid))
    start = time.time()
    trainer.run(iterations or 10**9, should_stop=lambda: time.time() - start > 60 * minutes,
                callback=lambda r: log(f"iteration {r['iteration']}: {r}") if r["iteration"] % 200 == 0 else None)
    trainer.close()
    recipe = distill.student_recipe(settings, family="fastgen-digits", teacher="digit_teacher")
    return merge_lora(net, adapters[distill.STUDENT]), recipe, trainer


WORLD_PATH = os.path.join(metrics.ASSETS, "game_world_model.safetensors")
WORLD_STUDENT_PATH = os.path.join(metrics.ASSETS, "game_world_student.safetensors")
NULL_ACTION = networks.NUM_ACTIONS - 1  # "no action given": dropped in 10% of training clips, for guidance


def world_recipe(steps: int = 4, chunk_frames: int = 4) -> Recipe:
    return Recipe(family="fastgen-game", prediction="flow", steps=steps, sampler="multistep_ode", cfg=1.0, shift=1.0,
                  method="diffusion-forcing", extra={"chunk_frames": chunk_frames})


def game_pool(episodes: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Game episodes [N, 3, T, 64, 64] and their actions [N, T] (training worlds: seeds from `seed`)."""
    clips = [data.game_episode(seed + i, frames) for i in range(episodes)]
    return torch.stack([c[0].transpose(0, 1) for c in clips]), torch.stack([c[1] for c in clips])


def world_loss(net, x0, actions, chunk_frames: int, generator=None):
    """Diffusion forcing with teacher forcing mixed in, over a block-causal sequence of chunks.

    Every chunk gets its own noise level (diffusion forcing); in half the clips the chunks before a
    random one are clean instead, as the causal loop's cache holds them at generation (teacher
    forcing). The loss is on the clean frames the network predicts (`config.prediction` "x0"; or
    on the velocity), over the noisy frames only: clean ones are given, not predicted."""
    b, _, t = x0.shape[:3]
    chunks = t // chunk_frames
    level = torch.rand(b, chunks, generator=generator)
    forced = torch.rand(b, generator=generator) < 0.5
    current = torch.randint(0, chunks, (b,), generator=generator)
    before = torch.arange(chunks)[None, :] < current[:, None]
    level = torch.where(forced[:, None] & before, torch.zeros_like(level), level)
    sigma = level.repeat_interleave(chunk_frames, dim=1).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * noise
    # The null action (for guidance) in 10% of clips; not for camera-RoPE models, whose positions
    # follow the actions: a dropped action would tell them the camera stood still when it moved.
    dropped = torch.rand(b, generator=generator) < (0.0 if getattr(net.config, "camera_motion", None) else 0.1)
    actions = torch.where(dropped[:, None].to(actions.device), torch.full_like(actions, NULL_ACTION), actions)
    out = net.forward_sequence(x_t, sigma, actions, chunk_frames)
    target = x0 if net.config.prediction == "x0" else noise - x0
    weight = (sigma > 0).float()[:, None, :, None, None]
    return ((out - target) ** 2 * weight).sum() / (weight.sum() * x0[:, :, 0].numel() / b).clamp_min(1)


@torch.no_grad()
def world_probe(net, worlds: int = 6, chunk_frames: int = 4, seed: int = 1_000_000) -> str:
    """Does the model move the view the way the action says? For held-out worlds: a real first
    chunk as clean context, then one x0 guess (from pure noise) of the next chunk under each move
    action; the share of frame-to-frame shifts that match the action (`eval.estimate_shift`)."""
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(0)
    agree = total = 0
    for world_seed in range(seed, seed + worlds):
        frames, actions = data.game_episode(world_seed, chunk_frames)
        context = frames.transpose(0, 1)[None]
        for action in (1, 2, 3, 4):
            x = torch.cat([context, torch.randn(context.shape, generator=gen)], 2).to(device)
            sigma = torch.cat([torch.zeros(1, chunk_frames), torch.ones(1, chunk_frames)], 1).to(device)
            acts = torch.cat([actions[None], torch.full((1, chunk_frames), action)], 1).to(device)
            out = net.forward_sequence(x, sigma, acts, chunk_frames)
            out = out if net.config.prediction == "x0" else x - sigma[:, None, :, None, None] * out
            seq = out[0, :, chunk_frames - 1:].float().cpu()
            seq[:, 0] = context[0, :, -1]
            for i in range(chunk_frames):
                agree += metrics.estimate_shift(seq[:, i], seq[:, i + 1]) == data.view_shift(action)
                total += 1
    return f"motion agreement {agree / total * 100:.0f}% ({total} frames, 4 move actions)"


def train_world(minutes: float | None = 10.0, steps: int | None = None, batch: int = 16, lr: float = 1e-3, seed: int = 0,
                config: networks.CausalWorldDiTConfig = networks.CausalWorldDiTConfig(), chunk_frames: int = 4,
                clip_frames: int = 16, episodes: int = 256, episode_frames: int = 64, ema_decay: float = 0.999,
                warmup: int = 200, device: str = "cpu", log=print, probe=None, probe_every: int = 500) -> networks.CausalWorldDiT:
    """The embedded world model: the causal DiT on game clips (diffusion forcing + teacher forcing).
    `probe(ema_model) -> str`, if given, is logged every `probe_every` steps (e.g. action following)."""
    if (minutes is None) == (steps is None):
        raise ValueError("give exactly one of minutes or steps")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    frames, actions = game_pool(episodes, episode_frames, seed)
    frames, actions = frames.to(device), actions.to(device)
    net = networks.CausalWorldDiT(config).init_weights(seed).to(device)

    def batch_loss():
        rows = torch.randint(0, episodes, (batch,), generator=gen)
        offsets = torch.randint(0, episode_frames - clip_frames + 1, (batch,), generator=gen)
        window = offsets[:, None] + torch.arange(clip_frames)[None]
        x0 = frames[rows[:, None].to(device), :, window.to(device)].permute(0, 2, 1, 3, 4)
        return world_loss(net, x0, actions[rows[:, None].to(device), window.to(device)], chunk_frames, gen)

    ema, done, seconds = fit(net, batch_loss, "world", minutes, steps, lr, warmup, ema_decay, log, probe, probe_every)
    log(f"world model trained: {done} steps of {batch} clips of {clip_frames} frames in {seconds:.0f}s")
    return ema


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("classifier", help="train the evaluation classifier")
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--out", default=metrics.CLASSIFIER_PATH)
    t = sub.add_parser("teacher", help="train the image teacher")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 18)")
    budget.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--dim", type=int, default=128)
    t.add_argument("--depth", type=int, default=6)
    t.add_argument("--device", default="cpu", help="cpu, or cuda to go further on a GPU")
    t.add_argument("--out", default=TEACHER_PATH)
    s = sub.add_parser("student", help="distill the shipped teacher into a few-step student (DMD2 via modelopt)")
    s.add_argument("--student-steps", type=int, default=4)
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--rank", type=int, default=32)
    s.add_argument("--guidance", type=float, default=3.0)
    s.add_argument("--update-freq", type=int, default=5)
    s.add_argument("--device", default="cpu")
    s.add_argument("--gan-weight", type=float, default=0.0, help="DMD2's GAN term on real digits (0: off, data-free)")
    s.add_argument("--out", default=None, help="default: assets/digit_student_<N>step.safetensors")
    w = sub.add_parser("world", help="the embedded game world model (causal DiT, diffusion forcing)")
    w.add_argument("--minutes", type=float, default=10.0)
    w.add_argument("--batch", type=int, default=16)
    w.add_argument("--lr", type=float, default=1e-3)
    w.add_argument("--dim", type=int, default=128)
    w.add_argument("--depth", type=int, default=4)
    w.add_argument("--clip-frames", type=int, default=12, help="frames per training clip (chunks of 4)")
    w.add_argument("--warmup", type=int, default=100)
    w.add_argument("--no-camera", action="store_true", help="frame-only RoPE (the model then ignores the keys: RESULTS.md)")
    w.add_argument("--device", default="cpu")
    w.add_argument("--out", default=WORLD_PATH)
    ws = sub.add_parser("world-student", help="self-forcing DMD of the world model into a few-step student")
    ws.add_argument("--teacher", default=WORLD_PATH)
    ws.add_argument("--minutes", type=float, default=20.0)
    ws.add_argument("--student-steps", type=int, default=2)
    ws.add_argument("--batch", type=int, default=8)
    ws.add_argument("--lr", type=float, default=2e-4)
    ws.add_argument("--fake-lr", type=float, default=None, help="the fake score's learning rate (default: --lr)")
    ws.add_argument("--rank", type=int, default=16)
    ws.add_argument("--context-chunks", type=int, default=2)
    ws.add_argument("--device", default="cpu")
    ws.add_argument("--out", default=WORLD_STUDENT_PATH)
    for p in (c, t, s, w, ws):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.what == "world-student":
        from . import self_forcing

        net, teacher_recipe = checkpoint.load_network(args.teacher)
        settings = self_forcing.SelfForcingSettings(steps=args.student_steps, batch=args.batch, lr=args.lr,
                                                    fake_lr=args.fake_lr or args.lr,
                                                    rank=args.rank, context_chunks=args.context_chunks, seed=args.seed,
                                                    chunk_frames=world.recipe_chunk_frames(teacher_recipe, args.teacher))
        student, recipe, _ = self_forcing.distill_world(net.to(args.device), args.minutes, settings=settings,
                                                         probe=world_probe, log=functools.partial(print, flush=True))
        recipe = dataclasses.replace(recipe, teacher=os.path.basename(args.teacher))
        checkpoint.save_network(args.out, student, recipe)
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
        return

    if args.what == "world":
        config = networks.CausalWorldDiTConfig(dim=args.dim, depth=args.depth, heads=max(2, args.dim // 32),
                                               camera_motion=None if args.no_camera else data.camera_motion())
        net = train_world(args.minutes, batch=args.batch, lr=args.lr, seed=args.seed, config=config, device=args.device,
                          clip_frames=args.clip_frames, warmup=args.warmup, probe=world_probe)
        checkpoint.save_network(args.out, net, world_recipe())
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
        return
    if args.what == "student":
        student, recipe, trainer = train_student(args.student_steps, args.minutes, args.batch, args.lr, args.rank, args.guidance,
                                                 args.update_freq, args.seed, args.device, gan_weight=args.gan_weight)
        out = args.out or os.path.join(metrics.ASSETS, f"digit_student_{args.student_steps}step.safetensors")
        checkpoint.save_network(out, student, recipe)
        print(f"{trainer.iteration} iterations; wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
        classifier = metrics.load_classifier()
        labels = torch.arange(500) % 10
        samples = networks.sample_with_recipe(student.to(args.device), labels, recipe, seed=1)
        acc = metrics.conditional_accuracy(classifier, samples, labels)
        fid = metrics.fid_vs_train(classifier, data.from_model_space(samples))
        print(f"student@{args.student_steps}: accuracy {acc:.3f}, FID-like {fid:.2f} on 500 samples")
        return

    if args.what == "classifier":
        net = metrics.train_classifier(steps=args.steps, seed=args.seed)
        held = data.load_mnist("heldout")
        acc = (metrics.predict(net, held.images) == held.labels).float().mean().item()
        print(f"held-out accuracy {acc:.4f}")
        checkpoint.save_network(args.out, net)
        print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
        return

    if args.minutes is None and args.steps is None:
        args.minutes = 18.0
    config = networks.DigitDiTConfig(dim=args.dim, depth=args.depth, heads=max(1, args.dim // 32))
    net = train_teacher(minutes=args.minutes, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, config=config,
                        device=args.device)
    checkpoint.save_network(args.out, net, TEACHER_RECIPE)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    classifier = metrics.load_classifier()
    labels = torch.arange(200) % 10
    samples = networks.sample_digits(net, labels, steps=TEACHER_RECIPE.steps, guidance=TEACHER_RECIPE.cfg, seed=1)
    print(f"quick check: conditional accuracy {metrics.conditional_accuracy(classifier, samples, labels):.3f} on 200 samples")


if __name__ == "__main__":
    main()
