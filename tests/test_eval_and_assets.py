"""The shipped assets: the evaluation classifier and the image teacher meet their bars."""

import os

import pytest
import torch

from fastgen_core import checkpoint
from fastgen_core import eval as metrics
from fastgen_core.data import load_mnist, to_model_space
from fastgen_core.images import make_grid, write_png
from fastgen_core.networks import DigitDiT, sample_digits
from fastgen_core.train import TEACHER_PATH


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    feats = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-6
    assert metrics.frechet_distance(feats, feats + 1.0) == pytest.approx(8.0, rel=1e-3)


def test_shipped_assets_are_small_fp16_safetensors():
    for path, limit_mb in ((metrics.CLASSIFIER_PATH, 1.0), (TEACHER_PATH, 5.0)):
        assert os.path.getsize(path) <= limit_mb * 1e6, path
        tensors = checkpoint.load_state_dict(path)
        assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_shipped_classifier_reads_held_out_digits_and_gives_a_low_floor():
    classifier = metrics.load_classifier()
    held = load_mnist("heldout")
    accuracy = (metrics.predict(classifier, held.images) == held.labels).float().mean().item()
    assert accuracy >= 0.97
    floor = metrics.fid_floor(classifier, 500)
    noise = metrics.fid_vs_train(classifier, torch.rand(500, 1, 28, 28))
    assert floor < 0.05 * noise, (floor, noise)


def test_shipped_teacher_carries_its_recipe_and_draws_the_requested_digits():
    net, recipe = checkpoint.load_network(TEACHER_PATH)
    assert isinstance(net, DigitDiT)
    assert (recipe.family, recipe.prediction, recipe.steps, recipe.cfg) == ("fastgen-digits", "flow", 32, 3.0)
    labels = torch.arange(50) % 10
    samples = sample_digits(net, labels, steps=recipe.steps, guidance=recipe.cfg, seed=123)
    assert metrics.conditional_accuracy(metrics.load_classifier(), samples, labels) >= 0.9


def test_png_writer_round_trips_through_pillow(tmp_path):
    import numpy as np
    from PIL import Image

    images = (to_model_space(load_mnist("heldout").images[:6]) + 1) / 2
    grid = make_grid(images, rows=2)
    write_png(str(tmp_path / "g.png"), grid, scale=2)
    back = np.asarray(Image.open(tmp_path / "g.png")).astype(np.float32) / 255
    expected = (grid.permute(1, 2, 0).numpy() * 255).round() / 255
    np.testing.assert_allclose(back[::2, ::2], expected, atol=1e-6)


STUDENTS = {4: "digit_student_4step.safetensors", 1: "digit_student_1step.safetensors"}


@pytest.mark.parametrize("steps", sorted(STUDENTS))
def test_shipped_students_carry_their_recipe_and_draw_the_requested_digits(steps):
    from fastgen_core.networks import sample_with_recipe

    path = os.path.join(metrics.ASSETS, STUDENTS[steps])
    assert os.path.getsize(path) <= 5e6
    net, recipe = checkpoint.load_network(path)
    assert (recipe.method, recipe.steps, recipe.cfg, recipe.sampler) == ("dmd2", steps, 1.0, "multistep_sde")
    assert len(recipe.timesteps) == steps and recipe.timesteps[0] == 999
    labels = torch.arange(50) % 10
    samples = sample_with_recipe(net, labels, recipe, seed=123)
    assert metrics.conditional_accuracy(metrics.load_classifier(), samples, labels) >= 0.9


def test_demo_compares_every_shipped_model(tmp_path, capsys):
    from fastgen_core import demo

    out = str(tmp_path / "demo.png")
    demo.main(["--out", out, "--quality-samples", "20"])
    printed = capsys.readouterr().out
    for name in ("digit_teacher.safetensors", *STUDENTS.values()):
        assert name in printed
    assert os.path.getsize(out) > 0
