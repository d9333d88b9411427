"""#9 in the real host: FastGen Hub Download runs in a workflow against a seeded Hub cache (offline),
places the LoRA in the host's loras folder with its recipe sidecar, and FastGen Load Student LoRA
loads it with that recipe; offline misses and bad names fail with the reason."""

import os

import pytest
from comfy_host import ComfyServer, find_comfyui
from hub_seed import seed_hub_cache
from safetensors.torch import load_file, save
from tiny_models import lora_state_dict, save_safetensors, tiny_wan_state_dict

REPO = "fastgen-test/tiny-wan-lora"
FILENAME = "hub_lightx2v_step_distill_tiny.safetensors"  # recognised as lightx2v's step distill: that recipe


@pytest.fixture(scope="module")
def hub_comfy(tmp_path_factory):
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("hub_host")
    wan = tiny_wan_state_dict(seed=0)
    model = save_safetensors(wan, str(folder / "tiny_wan.safetensors"))
    cache = str(folder / "hub-cache")
    seed_hub_cache(cache, REPO, FILENAME, save({k: v.contiguous() for k, v in lora_state_dict(wan, "comfy", seed=2, std=0.2).items()}))
    server = ComfyServer(path, extra_models={"diffusion_models": [model]},
                         env={"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}).start()
    yield server
    server.stop()


def download(student="custom", repo_id=REPO, filename=FILENAME, folder="loras"):
    return {"class_type": "FastGenHubDownload", "inputs": {"student": student, "repo_id": repo_id, "filename": filename, "folder": folder}}


def lora_graph(hub_node):
    width = 4096  # Wan's text width
    return {
        "hub": hub_node,
        "m": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}},
        "lora": {"class_type": "FastGenLoadStudentLoRA", "inputs": {"model": ["m", 0], "lora_name": ["hub", 0], "strength": 1.0}},
        "c": {"class_type": "FastGenTestConditioning", "inputs": {"seed": 0, "tokens": 8, "width": width}},
        "l": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 1, "batch_size": 1}},
        "s": {"class_type": "FastGenStudentSampler", "inputs": {
            "model": ["lora", 0], "positive": ["c", 0], "latent_image": ["l", 0], "seed": 1, "steps": 0, "cfg": 0.0,
            "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
        "out": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/hub"}},
    }


def text(entry, node_id):
    return "\n".join(entry["outputs"].get(node_id, {}).get("text", []))


def test_node_is_listed_with_the_catalogue_and_tooltips(hub_comfy):
    info = hub_comfy.get("/object_info")["FastGenHubDownload"]
    assert info["category"] == "FastGen/load"
    required = info["input"]["required"]
    options = required["student"][1]["options"]
    assert "SDXL-Lightning 4-step LoRA" in options and options[-1] == "custom"
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert info["output"][0] == "COMBO", "the file name must link into the loaders' file-name inputs"


def test_download_in_a_workflow_then_the_lora_loader_uses_its_recipe(hub_comfy):
    entry = hub_comfy.run_prompt(lora_graph(download()))
    placed = os.path.join(hub_comfy.base, "models", "loras", FILENAME)
    assert os.path.isfile(placed) and os.path.isfile(placed + ".recipe.json")
    assert load_file(placed)  # a readable safetensors, byte-identical to the cached blob
    assert text(entry, "hub").startswith(f"{FILENAME} in loras: downloaded\nas models/loras/{FILENAME}")
    assert "from its sidecar" in text(entry, "lora") and REPO in text(entry, "lora")
    assert text(entry, "s").startswith("4 steps, cfg 1, multistep_sde, sigmas 1, 0.938"), text(entry, "s")  # lightx2v at shift 5
    assert [p for p in hub_comfy.output_files(entry) if p.endswith(".latent")]


def test_a_catalogue_student_missing_offline_fails_with_how_to_place_it(hub_comfy):
    with pytest.raises(AssertionError) as err:
        hub_comfy.run_prompt(lora_graph(download(student="SDXL-Lightning 4-step LoRA")))
    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message and "Place it by hand" in message
    assert os.path.join(hub_comfy.base, "models", "loras", "sdxl_lightning_4step_lora.safetensors") in message


@pytest.mark.parametrize("filename", ["../escape.safetensors", "/tmp/escape.safetensors"])
def test_bad_custom_file_names_are_refused_before_running(hub_comfy, filename):
    status, body = hub_comfy.post("/prompt", {"prompt": lora_graph(download(filename=filename)), "client_id": "t"})
    assert status == 400, body
    assert "must" in str(body) and filename in str(body)
    assert not os.path.exists(os.path.join(hub_comfy.base, "models", "escape.safetensors"))
