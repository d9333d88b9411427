"""The embedded game world model, measured against the game's own renderer.

    python benchmarks/world_model.py                      # the shipped student (the play workflow's), 2 CPU threads
    python benchmarks/world_model.py --model other.safetensors --episodes 4 --long 300

For held-out worlds (seeds the training never saw), the model gets the first chunk of real frames
(into its cache) and then the player's actions, and generates the rest; the renderer draws the
true frames for the same actions. Printed and drawn (benchmarks/world_model.png; and
benchmarks/world_model_frames.png: a held-out episode's first 32 frames, every 2nd, the renderer's
on top, the model's below — the first 4 are the real start it was given):

- action following over 100 frames: PSNR of each generated frame against the true one, beside the
  "frozen" baseline (the last real frame repeated), and motion agreement: the share of frames whose
  shift against the previous generated frame (`eval.estimate_shift`) is the one the action makes;
- long horizon: 1,000 frames with the rolling cache (window + sink), the same two measures per
  frame and the frames' contrast (a collapsing model fades to flat colour or saturates);
- speed: frames per second of the rollout at 64x64, batch 1, the recipe's steps.

New content entering at the view's edge cannot be predicted (the model never saw that world), so
PSNR falls with distance travelled for any model; motion agreement does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from fastgen_core import checkpoint, data, images, train, world  # noqa: E402
from fastgen_core import eval as eval_module  # noqa: E402

HELD_OUT_SEED = 1_000_000  # training worlds use seeds 0..episodes-1


def generate(net, recipe, frames, actions, window, sink, seed=0):
    """Frames [1, 3, T, 64, 64]: the first chunk real, the rest generated for `actions` [1, T]."""
    chunk = int(recipe.extra.get("chunk_frames", 4))
    schedule = world.ChunkSchedule.for_recipe(recipe)
    sampler = recipe.multistep_noise(default="ode")
    total = frames.shape[2]
    cache = world.KVCache(sink_frames=sink, window_frames=window)
    out = [frames[:, :, :chunk]]
    for part in world.rollout(net, cache, chunks=(total - chunk) // chunk, chunk_frames=chunk, schedule=schedule,
                              actions=actions, prefix=(frames[:, :, :chunk], actions[:, :chunk]), sampler=sampler,
                              seed=seed, device="cpu"):
        out.append(part.latents.clamp(-1, 1))
    return torch.cat(out, 2)


def to_psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR of a mean squared error in model space (range 2). Averages are taken over errors, not
    over PSNRs: a standing player makes frames equal to the frozen one, an infinite PSNR."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def per_frame(generated, truth, actions, real_frames):
    """Squared error against the truth, the frozen baseline's (the last real frame held), motion
    agreement (0/1) and contrast, per frame."""
    last_real = truth[0, :, real_frames - 1]
    error, frozen, agree, contrast = [], [], [], []
    for t in range(truth.shape[2]):
        g, r = generated[0, :, t], truth[0, :, t]
        error.append(float(((g - r) ** 2).mean()))
        contrast.append(float(g.std()))
        frozen.append(float(((last_real - r) ** 2).mean()))
        if t == 0:
            agree.append(1.0)
            continue
        expected = data.view_shift(int(actions[0, t]))
        agree.append(float(eval_module.estimate_shift(generated[0, :, t - 1], g) == expected))
    return torch.tensor(error), torch.tensor(frozen), torch.tensor(agree), torch.tensor(contrast)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=train.WORLD_STUDENT_PATH)
    parser.add_argument("--episodes", type=int, default=8, help="held-out worlds for the 100-frame test")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--long", type=int, default=1000, help="frames of the long-horizon run (0: skip)")
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--png", default=os.path.join(REPO, "benchmarks", "world_model.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, recipe = checkpoint.load_network(args.model)
    net.eval()
    chunk = int(recipe.extra.get("chunk_frames", 4))
    print(f"model {args.model}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters, "
          f"{os.path.getsize(args.model) / 1e6:.2f} MB, {recipe.steps} steps per chunk of {chunk} frames, {recipe.sampler}")

    frames_needed = chunk * (-(-args.frames // chunk))
    rows = []
    for episode in range(args.episodes):
        truth, actions = data.game_episode(HELD_OUT_SEED + episode, frames_needed)
        truth, actions = truth.transpose(0, 1)[None], actions[None]
        generated = generate(net, recipe, truth, actions, args.window, args.sink, seed=episode)
        rows.append(per_frame(generated, truth, actions, chunk))
        if episode == 0:  # a picture: the renderer's frames over the model's, every 2nd of the first 32
            strip = torch.cat([truth[0, :, :32:2], generated[0, :, :32:2]], 1).transpose(0, 1)  # [32, C, H, W]
            frames_png = os.path.splitext(args.png)[0] + "_frames.png"
            images.write_png(frames_png, images.make_grid((strip.clamp(-1, 1) + 1) / 2, rows=2), scale=2)
    mse, frozen_mse, agree, _ = (torch.stack(r)[:, chunk:].mean(0) for r in zip(*rows, strict=True))
    psnr, frozen = to_psnr(mse), to_psnr(frozen_mse)
    taken = torch.stack([data.game_episode(HELD_OUT_SEED + e, frames_needed)[1] for e in range(args.episodes)])[:, chunk:]
    still = torch.tensor([data.view_shift(a) == (0, 0) for a in taken.flatten().tolist()]).float().mean()
    print(f"action following, {args.episodes} held-out worlds, frames {chunk}..{frames_needed - 1}: "
          f"PSNR {to_psnr(mse.mean()):.2f} dB (frozen last frame {to_psnr(frozen_mse.mean()):.2f} dB), "
          f"motion agreement {agree.mean() * 100:.1f}% (a frozen picture scores {still * 100:.0f}%: the share of "
          f"actions that do not move the view)")
    generated_count = frames_needed - chunk
    for upto in sorted({u for u in (8, 16, 32, 64) if u < generated_count} | {generated_count}):
        print(f"  first {upto:3d} generated frames: PSNR {to_psnr(mse[:upto].mean()):.2f} dB, "
              f"frozen {to_psnr(frozen_mse[:upto].mean()):.2f} dB")
    charts = [images.line_chart({"model": psnr.tolist(), "frozen": frozen.tolist()}, shared=True)]

    if args.long:
        long_frames = chunk * (-(-args.long // chunk))
        truth, actions = data.game_episode(HELD_OUT_SEED + 999, long_frames)
        truth, actions = truth.transpose(0, 1)[None], actions[None]
        start = time.perf_counter()
        generated = generate(net, recipe, truth, actions, args.window, args.sink, seed=999)
        seconds = time.perf_counter() - start
        l_mse, _, l_agree, contrast = per_frame(generated, truth, actions, chunk)
        true_contrast = truth[0].transpose(0, 1).flatten(1).std(1)
        print(f"long horizon: {long_frames} frames in {seconds:.1f} s ({(long_frames - chunk) / seconds:.1f} FPS), "
              f"window {args.window} + sink {args.sink}")
        for lo in range(0, long_frames, long_frames // 5):
            hi = lo + long_frames // 5
            print(f"  frames {lo:4d}..{hi - 1:4d}: motion agreement {l_agree[lo:hi].mean() * 100:5.1f}%, "
                  f"contrast {contrast[lo:hi].mean():.3f} (true {true_contrast[lo:hi].mean():.3f}), "
                  f"PSNR {to_psnr(l_mse[max(lo, chunk):hi].mean()):.2f} dB")
        smooth = torch.nn.functional.avg_pool1d(l_agree[None, None], 25, 1).flatten()
        charts.append(images.line_chart({"motion agreement (25-frame mean)": smooth.tolist(),
                                         "contrast": (contrast / true_contrast.mean()).clamp(0, 2).tolist()}, shared=True))

    # speed: the recipe's loop alone, no metric work, batch 1
    cache = world.KVCache(sink_frames=args.sink, window_frames=args.window)
    schedule = world.ChunkSchedule.for_recipe(recipe)
    loop = world.rollout(net, cache, chunks=None, chunk_frames=chunk, schedule=schedule, device="cpu")
    for _ in range(3):
        next(loop)  # warm-up, and the window fills
    start, frames_done = time.perf_counter(), 0
    while time.perf_counter() - start < 5.0:
        frames_done += next(loop).latents.shape[2]
    fps = frames_done / (time.perf_counter() - start)
    print(f"speed: {fps:.1f} FPS at 64x64 ({args.threads} threads, {recipe.steps} steps per chunk of {chunk}, "
          f"window {args.window} + sink {args.sink})")
    grid = torch.cat([c.permute(2, 0, 1) for c in charts], dim=1)
    images.write_png(args.png, grid)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
