"""The one atomic write every saver uses, and the one safetensors header reader."""

import os

import pytest
import torch
from safetensors.torch import save_file

from fastgen_core import files
from fastgen_core.recipe import Recipe, read_sidecar, write_sidecar


def test_the_data_reach_the_disk_before_the_file_takes_its_name(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "model.safetensors"
    with files.atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"weights")
    assert target.read_bytes() == b"weights"
    assert events[:2] == ["fsync", ("replace", "model.safetensors")]


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), files.atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ["model.safetensors"] and target.read_bytes() == b"old"


def test_a_sidecar_that_cannot_be_written_leaves_the_old_one(tmp_path):
    path = str(tmp_path / "student.safetensors")
    recipe = Recipe(family="sdxl", prediction="eps", steps=4)
    write_sidecar(path, recipe, repo_id="org/repo")
    with pytest.raises(TypeError):
        write_sidecar(path, recipe, repo_id=object())  # not JSON-serialisable
    assert read_sidecar(path)["repo_id"] == "org/repo"
    assert sorted(os.listdir(tmp_path)) == ["student.safetensors.recipe.json"]


def test_the_longest_name_a_file_system_allows_is_written(tmp_path):
    # the temporary name must not outgrow the 255 bytes the final name may take
    target = tmp_path / ("é" * 121 + ".safetensors")
    assert len(target.name.encode()) == 254
    with files.atomic_path(str(target)) as tmp:
        save_file({"w": torch.zeros(2)}, tmp, metadata={"k": "v"})
    assert files.read_metadata(str(target)) == {"k": "v"}


def test_read_metadata_names_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        files.read_metadata(str(tmp_path / "nope.safetensors"))
    for name, data in (("garbage.safetensors", b"not a safetensors file"), ("weights.pth", b"PK\x03\x04")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name} is not a readable safetensors"):
            files.read_metadata(str(tmp_path / name))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    assert files.read_metadata(str(tmp_path / "bare.safetensors")) == {}


def test_a_saved_file_gets_the_mode_a_plain_open_would_give_it(tmp_path):
    import stat

    target = tmp_path / "lora.safetensors"
    with files.atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
