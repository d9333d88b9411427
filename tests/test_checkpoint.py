import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastgen_core import checkpoint, files
from fastgen_core.networks import DigitDiT, DigitDiTConfig
from fastgen_core.recipe import RECIPE_KEY, Recipe

TINY = DigitDiTConfig(dim=32, depth=2, heads=2)
RECIPE = Recipe(family="fastgen-digits", prediction="flow", steps=4, timesteps=[999, 749, 499, 249], cfg=1.0, method="dmd2",
                teacher="digit_teacher")


def saved(tmp_path, name="net.safetensors"):
    net = DigitDiT(TINY).init_weights(3)
    path = str(tmp_path / name)
    checkpoint.save_network(path, net, RECIPE)
    return net, path


def test_round_trip_keeps_weights_config_and_recipe(tmp_path):
    net, path = saved(tmp_path)
    loaded, recipe = checkpoint.load_network(path)
    assert recipe == RECIPE
    assert loaded.config == TINY
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value.half().float())
    arch, config, recipe2 = checkpoint.network_info(path)
    assert arch == "DigitDiT" and config == TINY.to_dict() and recipe2 == RECIPE


def test_metadata_is_read_without_loading_tensors(tmp_path):
    _, path = saved(tmp_path)
    metadata = files.read_metadata(path)
    assert json.loads(metadata[RECIPE_KEY])["steps"] == 4
    assert all(isinstance(v, str) for v in metadata.values())


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        checkpoint.load_network(path)


def test_corrupt_and_truncated_files_name_the_path(tmp_path):
    _, path = saved(tmp_path)
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    for bad in (truncated, garbage):
        with pytest.raises(ValueError, match=bad.name):
            checkpoint.load_network(str(bad))


def test_foreign_safetensors_is_refused_with_a_hint(tmp_path):
    path = str(tmp_path / "flux.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(ValueError, match="not a FastGen network.*Load Diffusion Model"):
        checkpoint.load_network(path)


def test_mismatched_and_nan_weights_are_refused(tmp_path):
    _, path = saved(tmp_path)
    meta = files.read_metadata(path)
    tensors = checkpoint.load_state_dict(path)
    bad_shape = dict(tensors, **{"patch_embed.weight": torch.zeros(5, 5, dtype=torch.float16)})
    save_file(bad_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="patch_embed.weight has shape"):
        checkpoint.load_network(str(tmp_path / "shape.safetensors"))
    nan = dict(tensors)
    nan["patch_embed.weight"] = torch.full_like(nan["patch_embed.weight"], float("nan"))
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="NaN"):
        checkpoint.load_network(str(tmp_path / "nan.safetensors"))


def test_a_failed_save_leaves_no_file_behind(tmp_path, monkeypatch):
    net, path = saved(tmp_path)
    before = open(path, "rb").read()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save_network(path, net, RECIPE)
    assert open(path, "rb").read() == before  # the previous good file is untouched
    assert os.listdir(tmp_path) == ["net.safetensors"]  # no temporary left over


def test_recipe_validation_and_forward_compatibility():
    with pytest.raises(ValueError, match="prediction"):
        Recipe(family="x", prediction="x0", steps=4)
    with pytest.raises(ValueError, match="2 timesteps for 4 steps"):
        Recipe(family="x", prediction="eps", steps=4, timesteps=[999, 499])
    with pytest.raises(ValueError, match="not valid JSON"):
        Recipe.from_json("{", source="f.safetensors")
    with pytest.raises(ValueError, match="f.safetensors"):
        Recipe.from_json('{"family": "x"}', source="f.safetensors")
    newer = json.loads(RECIPE.to_json()) | {"future_knob": 7}
    assert Recipe.from_json(json.dumps(newer)).extra == {"future_knob": 7}


@pytest.mark.parametrize("arch,config", [
    ("CausalWorldDiT", {"dim": 2048, "depth": 8, "heads": 16}),
    ("DigitDiT", {"dim": 2048, "depth": 8, "heads": 16}),
])
def test_metadata_asking_for_a_huge_network_is_refused_before_anything_is_built(tmp_path, arch, config):
    """A few hundred bytes whose metadata declares a 0.4 B-parameter network (1.6 GB in fp32): refused
    from the header, in well under a second, without the process growing."""
    import resource
    import time

    path = str(tmp_path / "bomb.safetensors")
    save_file({"weight": torch.zeros(2, 2)}, path,
              metadata={checkpoint.NETWORK_KEY: json.dumps({"arch": arch, "config": config})})
    assert os.path.getsize(path) < 1000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError, match="do not match the architecture"):
        checkpoint.load_network(path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024


@pytest.mark.parametrize("name,expected", [
    ("fastgen/student", "fastgen/student.safetensors"),
    ("  a\\b.safetensors ", "a/b.safetensors"),
])
def test_save_names_become_relative_safetensors_paths(name, expected):
    assert checkpoint.check_save_name(name) == expected


@pytest.mark.parametrize("name,reason", [
    ("", "empty"), ("   ", "empty"), ("x" * 300, "bytes long"), ("a/" + "é" * 130, "bytes long"),
    ("bad\x00name", "control character"), ("line\nbreak", "control character"),
    ("/etc/passwd", "absolute"), ("C:/models/x", "drive"), ("c:x", "drive"),
    ("../escape", "'..'"), ("a//b", "empty"), ("./a", "'.'"), ("a/.tmp-123b", "hidden"),
    ("CON", "reserved"), ("fastgen/nul.txt", "reserved"),
])
def test_bad_save_names_are_refused_with_the_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        checkpoint.check_save_name(name)
