"""The procedural game (#8): deterministic, the camera follows the agent, actions do what they say."""

import pytest
import torch

from fastgen_core import data
from fastgen_core import eval as eval_module


def test_same_seed_same_world_and_frames():
    a, b = data.game_episode(3, 20), data.game_episode(3, 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(data.game_episode(4, 20)[0], a[0])
    frames, actions = a
    assert frames.shape == (20, 3, 64, 64) and frames.min() >= -1 and frames.max() <= 1 and actions.shape == (20,)


@pytest.mark.parametrize("action, dx, dy", [(1, 0, -1), (2, 0, 1), (3, -1, 0), (4, 1, 0)])
def test_moving_shifts_the_view_the_other_way(action, dx, dy):
    game = data.Game(seed=5)
    before = game.step(0)
    after = game.step(action)
    s = data.GAME_SPEED
    # the world under the camera moves opposite to the agent; compare away from the agent at the centre
    shifted = torch.roll(before, shifts=(-dy * s, -dx * s), dims=(1, 2))
    border = torch.ones(64, 64, dtype=torch.bool)
    border[16:48, 16:48] = False
    border[:s], border[-s:], border[:, :s], border[:, -s:] = False, False, False, False  # wrapped by the roll
    assert torch.equal(after[:, border], shifted[:, border])
    assert not torch.equal(after[:, border], before[:, border]), "the view did not move"


def test_jump_grows_the_agent_then_lands():
    game = data.Game(seed=1)
    standing = game.step(0)
    jumping = game.step(5)
    assert not torch.equal(standing, jumping)
    for _ in range(data.JUMP_FRAMES):
        landed = game.step(0)
    assert torch.equal(landed, standing), "after the jump the agent stands where it stood"


def test_world_has_structure_and_bad_actions_are_refused():
    frames, _ = data.game_episode(0, 50)
    assert frames.std() > 0.2
    with pytest.raises(ValueError, match="game action 9"):
        data.Game(0).step(9)


def test_shift_estimator_reads_the_action_off_consecutive_frames():
    frames, actions = data.game_episode(123, 40)
    shifts = [eval_module.estimate_shift(frames[t - 1], frames[t]) for t in range(1, 40)]
    assert shifts == [data.view_shift(a) for a in actions[1:].tolist()]
    assert {data.view_shift(a) for a in range(len(data.GAME_ACTIONS))} == {(0, 0), (0, 8), (0, -8), (8, 0), (-8, 0)}
    assert eval_module.estimate_shift(frames[5], frames[5]) == (0, 0)
