"""#9: known students from the Hub into a folder with their recipe, through the real hf_hub_download
on a seeded local cache (no network anywhere in these tests)."""

import hashlib
import json
import os
import sys
import time
from dataclasses import replace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save, save_file

from fastgen_core import hub
from fastgen_core.files import read_metadata
from fastgen_core.recipe import KNOWN_STUDENTS, RECIPE_KEY, Recipe, lookup_recipe, read_sidecar, sidecar_path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "host"))
from hub_seed import COMMIT, seed_hub_cache  # noqa: E402

REPO = "fastgen-test/tiny-student"
# a name the known-students table recognises (lightx2v's step distill), so the entry gets that recipe
FILENAME = "loras/hub_lightx2v_step_distill_tiny.safetensors"


def tiny_lora_bytes(metadata=None) -> bytes:
    g = torch.Generator().manual_seed(0)
    return save({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(2, 8, generator=g),
                 "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(8, 2, generator=g)}, metadata=metadata)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A seeded cache (HF_HUB_CACHE) and offline mode, as huggingface_hub reads them (constants are read at
    import, so both the environment and the module constants are set); returns (cache, blob, data)."""
    cache = str(tmp_path / "hub-cache")
    data = tiny_lora_bytes()
    blob = seed_hub_cache(cache, REPO, FILENAME, data)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, blob, data


def entry(**overrides):
    return replace(hub.custom_entry(REPO, FILENAME, "loras"), **overrides)


def test_catalogue_entries_are_complete_and_carry_the_tables_recipe():
    names = hub.catalogue_names()
    assert len(names) == len(set(names)) and hub.CUSTOM not in names
    table = {id(s.recipe) for s in KNOWN_STUDENTS}
    for e in hub.CATALOGUE:
        assert e.folder in hub.FOLDERS and e.recipe is not None and e.recipe.source.startswith("https://")
        hub.check_filename(e.filename)
        assert e.revision is None or len(e.revision) == 40 and int(e.revision, 16) >= 0
        assert e.sha256 is None or len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        assert (e.revision or e.sha256) is None or e.pin_source, f"{e.name}: a pin must name where it comes from"
        # the table's own recipe object, or (for step counts taken from the name) a copy that differs only in steps
        student = next(s for s in KNOWN_STUDENTS if s.name == e.student)
        assert id(e.recipe) in table or replace(e.recipe, steps=student.recipe.steps) == student.recipe
    lightning = hub.catalogue_entry("SDXL-Lightning 8-step LoRA")
    assert lightning.recipe.steps == 8 and lightning.recipe.scheduler == "sgm_uniform"
    assert hub.catalogue_entry("TCD SDXL LoRA").target_name == "TCD-SDXL-LoRA.safetensors"
    with pytest.raises(hub.HubError, match="not in the FastGen Hub catalogue"):
        hub.catalogue_entry("nope")


def test_fetch_places_the_cached_file_by_hard_link_with_a_recipe_sidecar(hub_env, tmp_path):
    cache, blob, data = hub_env
    dest = tmp_path / "loras"
    placed = hub.fetch(entry(), str(dest))
    target = dest / "hub_lightx2v_step_distill_tiny.safetensors"
    assert placed.path == str(target) and placed.name == target.name and placed.downloaded
    assert target.read_bytes() == data  # byte-identical: the recipe goes beside it, not into it
    assert os.stat(target).st_ino == os.stat(blob).st_ino, "not hard-linked to the cache blob"
    assert placed.sha256 == hashlib.sha256(data).hexdigest()
    side = read_sidecar(str(target))
    assert side["repo_id"] == REPO and side["filename"] == FILENAME and side["revision"] == COMMIT
    assert side["sha256"] == placed.sha256 and side["size"] == len(data)
    assert Recipe.from_json(json.dumps(side["recipe"])) == entry().recipe
    assert sorted(os.listdir(dest)) == [target.name, target.name + ".recipe.json"], "temporary files left behind"


def test_copy_when_hard_links_are_refused(hub_env, tmp_path, monkeypatch):
    _, blob, data = hub_env

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(hub.os, "link", no_link)
    placed = hub.fetch(entry(), str(tmp_path / "loras"))
    assert open(placed.path, "rb").read() == data and os.stat(placed.path).st_ino != os.stat(blob).st_ino


def test_a_failed_copy_leaves_no_partial_file(hub_env, tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    def disk_full(src, dst):
        with open(dst, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hub.os, "link", no_link)
    monkeypatch.setattr(hub.shutil, "copyfile", disk_full)
    dest = tmp_path / "loras"
    with pytest.raises(hub.HubError, match="No space") as err:
        hub.fetch(entry(), str(dest))
    assert str(dest) in str(err.value) and os.listdir(dest) == []


def test_checksum_mismatch_deletes_the_file_and_says_so(hub_env, tmp_path):
    cache, blob, _ = hub_env
    dest = tmp_path / "loras"
    with pytest.raises(hub.ChecksumError) as err:
        hub.fetch(entry(sha256="0" * 64), str(dest))
    message = str(err.value)
    assert "checksum mismatch" in message and REPO in message and "deleted" in message and "0" * 64 in message
    assert os.listdir(dest) == [], "the placed or partial file survived a checksum mismatch"
    assert not os.path.exists(blob), "the corrupt blob stayed in the Hub cache"


def test_a_good_file_already_there_is_not_downloaded_again(hub_env, tmp_path, monkeypatch):
    dest = tmp_path / "loras"
    first = hub.fetch(entry(), str(dest))
    mtime = os.stat(first.path).st_mtime_ns

    def must_not_download(*args, **kwargs):
        raise AssertionError("hf_hub_download called for a file already in place")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_download)
    monkeypatch.setattr(hub, "sha256_of", lambda path: pytest.fail("re-hashed although the sidecar recorded this file"))
    again = hub.fetch(entry(), str(dest))
    assert not again.downloaded and again.sha256 == first.sha256 and os.stat(first.path).st_mtime_ns == mtime


def test_a_different_file_at_the_target_is_left_alone_and_reported(hub_env, tmp_path):
    dest = tmp_path / "loras"
    dest.mkdir()
    target = dest / "hub_lightx2v_step_distill_tiny.safetensors"
    target.write_bytes(b"someone else's file")
    good = hashlib.sha256(hub_env[2]).hexdigest()
    with pytest.raises(hub.ChecksumError, match="left untouched"):
        hub.fetch(entry(sha256=good), str(dest))
    assert target.read_bytes() == b"someone else's file"


def test_a_file_of_that_name_without_a_checksum_to_check_it_is_not_called_verified(hub_env, tmp_path):
    """A custom or unpinned entry has no published sha256: a file that merely has its name was not
    downloaded here and cannot be told apart from another, so it is not reported as verified."""
    dest = tmp_path / "loras"
    dest.mkdir()
    (dest / "hub_lightx2v_step_distill_tiny.safetensors").write_bytes(b"someone else's file")
    placed = hub.fetch(entry(), str(dest))
    assert not placed.downloaded and not placed.verified
    mine = tmp_path / "mine"
    first = hub.fetch(entry(), str(mine))
    assert first.downloaded and first.verified
    again = hub.fetch(entry(), str(mine))  # its own earlier download: checked against the recorded sha256
    assert not again.downloaded and again.verified


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "no network"])
def test_missing_file_offline_fails_fast_and_says_how_to_place_it(tmp_path, monkeypatch, offline):
    cache = str(tmp_path / "empty-cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # online mode, but the endpoint refuses connections (port 9 on the loopback: nothing listens)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    wanted = hub.catalogue_entry("SDXL-Lightning 4-step LoRA")
    dest = tmp_path / "loras"
    start = time.monotonic()
    with pytest.raises(hub.HubOfflineError) as err:
        hub.fetch(wanted, str(dest))
    assert time.monotonic() - start < 1.0
    message = str(err.value)
    for part in ("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", str(dest / "sdxl_lightning_4step_lora.safetensors"),
                 "'loras' folder", "Place it by hand", wanted.url, wanted.sha256, cache):
        assert part in message, (part, message)
    assert ("HF_HUB_OFFLINE" in message) == (offline == "HF_HUB_OFFLINE")
    assert not dest.exists() or os.listdir(dest) == []


def test_a_file_placed_by_hand_is_verified_and_gets_its_recipe(tmp_path, monkeypatch):
    """What the offline message asks for: copy the file into the folder, run again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tiny_lora_bytes()
    dest = tmp_path / "loras"
    dest.mkdir()
    (dest / "hub_lightx2v_step_distill_tiny.safetensors").write_bytes(data)
    placed = hub.fetch(entry(sha256=hashlib.sha256(data).hexdigest()), str(dest))
    assert not placed.downloaded and os.path.isfile(sidecar_path(placed.path))


def test_the_recipe_reaches_the_loaders_lookup_with_metadata_first(hub_env, tmp_path):
    dest = tmp_path / "loras"
    two_steps = Recipe(family="wan2.1", prediction="flow", steps=2, sampler="euler", method="test", source="https://example.org/card")
    placed = hub.fetch(entry(recipe=two_steps), str(dest))
    recipe, note = lookup_recipe(placed.path, read_metadata(placed.path), family="wan2.1", kind="lora")
    # the sidecar wins over the table, which would give lightx2v's 4 steps for this name
    assert recipe == two_steps and "sidecar" in note and REPO in note
    # a file's own metadata wins over its sidecar
    own = Recipe(family="wan2.1", prediction="flow", steps=3, method="own")
    path = str(dest / "with_metadata.safetensors")
    save_file({"w": torch.zeros(1)}, path, metadata={RECIPE_KEY: own.to_json()})
    os.link(sidecar_path(placed.path), sidecar_path(path))
    assert lookup_recipe(path, read_metadata(path))[0] == own
    # without either, the table
    os.remove(sidecar_path(placed.path))
    recipe, note = lookup_recipe(placed.path, {}, family="wan2.1", kind="lora")
    assert recipe.steps == 4 and "recognised as lightx2v" in note


@pytest.mark.parametrize("repo,filename,folder,match", [
    (REPO, "../escape.safetensors", "loras", r"'\.\.'"),
    (REPO, "a/../../escape.safetensors", "loras", r"'\.\.'"),
    (REPO, "/etc/escape.safetensors", "loras", "relative path"),
    (REPO, "C:\\models\\x.safetensors", "loras", "relative path"),
    (REPO, "sub\\x.safetensors", "loras", "relative path"),
    (REPO, "payload.py", "loras", "not a student file"),
    ("no-slash", "x.safetensors", "loras", "organisation/name"),
    ("../evil/x", "x.safetensors", "loras", "organisation/name"),
    (REPO, "x.safetensors", "checkpoints", "folder"),
])
def test_bad_custom_names_are_refused(repo, filename, folder, match):
    with pytest.raises(hub.HubError, match=match):
        hub.custom_entry(repo, filename, folder)


def test_custom_entries_get_the_table_recipe_only_when_recognised():
    assert hub.custom_entry(REPO, "sub/dir/sdxl_lightning_2step_lora.safetensors", "loras").recipe.steps == 2
    unknown = hub.custom_entry(REPO, "my_lora.safetensors", "loras")
    assert unknown.recipe is None and unknown.target_name == "my_lora.safetensors"


def test_unknown_custom_file_keeps_provenance_and_loads_without_recipe(tmp_path, monkeypatch):
    cache = str(tmp_path / "c")
    seed_hub_cache(cache, REPO, "my_lora.safetensors", tiny_lora_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    placed = hub.fetch(hub.custom_entry(REPO, "my_lora.safetensors", "loras"), str(tmp_path / "loras"), cache_dir=cache)
    assert read_sidecar(placed.path)["repo_id"] == REPO and "recipe" not in read_sidecar(placed.path)
    assert lookup_recipe(placed.path, {}, kind="lora") == (None, "")


def test_progress_reports_bytes():
    seen = []
    bar = hub.progress_tqdm(lambda done, total: seen.append((done, total)))(total=10, unit="B")
    bar.update(4)
    bar.update(6)
    bar.close()
    assert seen == [(4, 10), (10, 10)]


def test_command_lists_and_fetches(hub_env, tmp_path, capsys):
    assert hub.main(["list"]) == 0
    assert "SDXL-Lightning 4-step LoRA" in capsys.readouterr().out
    args = ["get", "custom", "--repo", REPO, "--file", FILENAME, "--dest", str(tmp_path / "loras")]
    assert hub.main(args) == 0
    assert "downloaded:" in capsys.readouterr().out
    assert hub.main(args) == 0 and "already present" in capsys.readouterr().out
    assert hub.main(["get", "FLUX.1 schnell", "--dest", str(tmp_path / "dm")]) == 2
    assert "Place it by hand" in capsys.readouterr().err


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A local HTTP server answering the two requests hf_hub_download makes (HEAD for the commit, etag and
    size; GET for the bytes), as HF_ENDPOINT, with an empty cache: the download path itself runs."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = tiny_lora_bytes() * 40  # a few chunks, so progress moves more than once
    served = []

    class Hub(BaseHTTPRequestHandler):
        def _headers(self):
            if self.path != f"/{REPO}/resolve/main/{FILENAME}":
                self.send_response(404)
                self.end_headers()
                return False
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return True

        def do_HEAD(self):
            self._headers()

        def do_GET(self):
            if self._headers():
                served.append(self.path)
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield data, served
    server.shutdown()


def test_download_reports_bytes_and_places_the_file(fake_hub, tmp_path):
    data, served = fake_hub
    seen = []
    placed = hub.fetch(entry(), str(tmp_path / "loras"), progress=lambda done, total: seen.append((done, total)))
    assert placed.downloaded and served == [f"/{REPO}/resolve/main/{FILENAME}"]
    assert open(placed.path, "rb").read() == data and read_sidecar(placed.path)["revision"] == COMMIT
    assert seen and seen[-1] == (len(data), len(data)) and all(total == len(data) for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_download_that_does_not_match_the_catalogue_is_deleted(fake_hub, tmp_path):
    dest = tmp_path / "loras"
    with pytest.raises(hub.ChecksumError, match="deleted"):
        hub.fetch(entry(sha256="f" * 64), str(dest))
    assert os.listdir(dest) == []
    cache_blobs = [f for _, _, files in os.walk(os.environ["HF_HUB_CACHE"]) for f in files if len(f) == 64]
    assert cache_blobs == [], "the corrupt download stayed in the Hub cache"
