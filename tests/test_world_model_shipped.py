"""The shipped game world models (#8) follow the keys: from a real first chunk of a held-out world,
each move key held for two chunks moves the generated view the way the game would."""

import os

import pytest
import torch

from fastgen_core import checkpoint, data, train, world
from fastgen_core import eval as eval_module

SHIPPED = [train.WORLD_PATH, train.WORLD_STUDENT_PATH]


def held_key_agreement(path, worlds=(1_000_000, 1_000_001)):
    net, recipe = checkpoint.load_network(path)
    chunk = int(recipe.extra.get("chunk_frames", 4))
    schedule = world.ChunkSchedule.for_recipe(recipe)
    sampler = recipe.multistep_noise()
    agree = total = 0
    for seed in worlds:
        frames, actions = data.game_episode(seed, chunk)
        for action in (1, 2, 3, 4):
            held = torch.cat([actions, torch.full((2 * chunk,), action)])[None]
            out = [frames.transpose(0, 1)[None]]
            for part in world.rollout(net, world.KVCache(sink_frames=4, window_frames=12), chunks=2, chunk_frames=chunk,
                                      schedule=schedule, actions=held, prefix=(out[0], held[:, :chunk]), sampler=sampler,
                                      seed=seed):
                out.append(part.latents.clamp(-1, 1))
            video = torch.cat(out, 2)[0]
            for t in range(chunk, video.shape[1]):
                agree += eval_module.estimate_shift(video[:, t - 1], video[:, t]) == data.view_shift(action)
                total += 1
    return net, recipe, agree / total


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_world_model_moves_the_view_the_way_the_key_says(path):
    net, recipe, agreement = held_key_agreement(path)
    assert net.config.camera_motion == tuple((float(dx), float(dy)) for dx, dy in data.camera_motion())
    assert recipe.family == "fastgen-game" and recipe.steps <= 4
    assert os.path.getsize(path) < 10e6
    # a frozen picture scores 0 on these frames (every one is a move)
    assert agreement >= 0.8, f"{os.path.basename(path)}: the view moved as the key says in {agreement:.0%} of frames"
