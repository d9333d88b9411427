"""#4 in the real host: the DMD node trains a LoRA student of the embedded teacher from a graph."""

import asyncio
import json
import os
import time
import uuid

import pytest
import torch
from safetensors import safe_open
from test_students_nodes import SD15, WAN, failure, graph, node_text, run_latent, unet

from fastgen_core.recipe import RECIPE_KEY, Recipe


def distill_graph(save_name, resume=False, iterations=6, seed=0, rank=4):
    return {
        "m": {"class_type": "FastGenLoadModel", "inputs": {"model_name": "embedded/digit_teacher.safetensors"}},
        "c": {"class_type": "FastGenDigitConditioning", "inputs": {"digits": "0123456789"}},
        "l": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "d": {"class_type": "FastGenDistillDMD", "inputs": {
            "model": ["m", 0], "positive": ["c", 0], "negative": ["c", 1], "latent": ["l", 0], "student_steps": 2,
            "iterations": iterations, "learning_rate": 1e-3, "lora_rank": rank, "guidance": 3.0, "update_ratio": 2, "batch_size": 2,
            "seed": seed, "save_name": save_name, "resume": resume}},
        "chart": {"class_type": "PreviewImage", "inputs": {"images": ["d", 2]}},
        "s": {"class_type": "FastGenStudentSampler", "inputs": {
            "model": ["d", 0], "positive": ["c", 0], "latent_image": ["l", 0], "seed": 1, "steps": 0, "cfg": 0.0,
            "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
        "out": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/dmd"}},
    }


def test_dmd_node_trains_saves_and_returns_the_student(comfy):
    latent, entry = run_latent(comfy, distill_graph("fastgen/test_student"))
    assert torch.isfinite(latent).all()
    assert ("6 iterations; saved fastgen/test_student.safetensors (models/loras/fastgen/test_student.safetensors)"
            in node_text(entry, "d"))
    assert entry["outputs"]["chart"]["images"], "no loss chart"
    assert node_text(entry, "s").startswith("2 steps, cfg 1, multistep_sde, sigmas 1, 0.5, 0")

    path = os.path.join(comfy.base, "models", "loras", "fastgen", "test_student.safetensors")
    with safe_open(path, "pt") as f:
        recipe = Recipe.from_json(f.metadata()[RECIPE_KEY])
        keys = list(f.keys())
    assert (recipe.method, recipe.steps, recipe.sigmas, recipe.family) == ("dmd2", 2, [1.0, 0.5], "fastgen-digits")
    assert recipe.teacher == "embedded/digit_teacher.safetensors"
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert os.path.isfile(path[: -len(".safetensors")] + ".fastgen-resume")

    # the saved LoRA loads in the host's own LoraLoader with nothing left over, and in ours with its recipe
    log_before = len(comfy.log())
    stock = {"m": {"class_type": "FastGenLoadModel", "inputs": {"model_name": "embedded/digit_teacher.safetensors"}},
             "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["m", 0], "lora_name": "fastgen/test_student.safetensors",
                                                                       "strength_model": 1.0}},
             "ours": {"class_type": "FastGenLoadStudentLoRA", "inputs": {"model": ["m", 0], "lora_name": "fastgen/test_student.safetensors",
                                                                          "strength": 1.0}},
             "c": {"class_type": "FastGenDigitConditioning", "inputs": {"digits": "3"}},
             "l": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
             "s": {"class_type": "FastGenStudentSampler", "inputs": {
                 "model": ["ours", 0], "positive": ["c", 0], "latent_image": ["l", 0], "seed": 1, "steps": 0, "cfg": 0.0,
                 "sampler": "recipe", "scheduler": "recipe", "denoise": 1.0}},
             "k": {"class_type": "KSampler", "inputs": {"model": ["lora", 0], "positive": ["c", 0], "negative": ["c", 1],
                                                        "latent_image": ["l", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
             "out": {"class_type": "SaveLatent", "inputs": {"samples": ["s", 0], "filename_prefix": "latents/dmd"}},
             "out2": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "latents/dmd_stock"}}}
    entry = comfy.run_prompt(stock)
    assert "from the file's fastgen.recipe metadata" in node_text(entry, "ours")
    log = comfy.log()[log_before:]
    assert "lora key not loaded" not in log and "ERROR lora" not in log


@pytest.mark.parametrize("bad", ["../escape", "/abs/path", "a/../../b", "", "x" * 300, "bad\x00name", "C:/loras/x"])
def test_dmd_node_refuses_bad_save_names_before_training(comfy, bad):
    message = failure(comfy, distill_graph(bad))
    # refused when the prompt is validated: nothing was trained
    assert "prompt rejected" in message and "save_name" in message


def test_dmd_node_never_overwrites_and_resumes(comfy):
    run_latent(comfy, distill_graph("fastgen/resumable", iterations=4))
    message = failure(comfy, distill_graph("fastgen/resumable", iterations=4, seed=1))
    assert "already exists" in message
    _, entry = run_latent(comfy, distill_graph("fastgen/resumable", iterations=8, resume=True))
    assert "8 iterations" in node_text(entry, "d")
    # the training state beside the LoRA is not offered as a LoRA, in our loaders or the host's
    assert os.path.isfile(os.path.join(comfy.base, "models", "loras", "fastgen", "resumable.fastgen-resume"))
    options = comfy.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert [o for o in options if o.startswith("fastgen/resumable")] == ["fastgen/resumable.safetensors"], options


def lora_recipe(comfy, name):
    path = os.path.join(comfy.base, "models", "loras", *name.split("/")) + ".safetensors"
    with safe_open(path, "pt") as f:
        return Recipe.from_json(f.metadata()[RECIPE_KEY]), list(f.keys())


def run_latents(comfy, prompt):
    """Run a prompt; ({file name prefix: saved latent}, the history entry)."""
    from safetensors.torch import load_file

    entry = comfy.run_prompt(prompt)
    files = [p for p in comfy.output_files(entry) if p.endswith(".latent")]
    return {os.path.basename(p).rsplit("_", 2)[0]: load_file(p)["latent_tensor"] for p in files}, entry


def tiny_distill(model_file, family, save_name, steps=2, **extra):
    """The DMD node on a tiny real architecture; its LORA_MODEL output goes through the core
    'Load LoRA Model' node into a stock KSampler, its MODEL through our Student KSampler."""
    prompt = graph(unet(model_file), ["m", 0], family=family)
    prompt["d"] = {"class_type": "FastGenDistillDMD", "inputs": {
        "model": ["m", 0], "positive": ["c1", 0], "negative": ["c2", 0], "latent": ["l", 0], "student_steps": steps,
        "iterations": 3, "learning_rate": 1e-3, "lora_rank": 2, "guidance": 2.0, "update_ratio": 2, "batch_size": 1,
        "seed": 0, "save_name": save_name, "resume": False, **extra}}
    prompt["s"]["inputs"]["model"] = ["d", 0]
    prompt["core"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["m", 0], "lora": ["d", 1], "strength_model": 1.0}}
    prompt["k"] = {"class_type": "KSampler", "inputs": {"model": ["core", 0], "positive": ["c1", 0], "negative": ["c2", 0],
                                                       "latent_image": ["l", 0], "seed": 1, "steps": steps, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["out2"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "latents/dmd_core"}}
    return prompt


def test_dmd_node_on_a_tiny_wan_keeps_exact_sigmas_under_the_model_shift(comfy):
    log_before = len(comfy.log())
    latents, entry = run_latents(comfy, tiny_distill("tiny_wan.safetensors", WAN, "fastgen/tiny_wan_dmd", gradient_checkpointing=True))
    assert len(latents) == 2 and all(torch.isfinite(x).all() for x in latents.values()), latents.keys()
    recipe, keys = lora_recipe(comfy, "fastgen/tiny_wan_dmd")
    # timesteps 1000, 500 through Wan's DiscreteFlow at the host's shift 8: sigma = 8t / (1 + 7t)
    assert (recipe.prediction, recipe.family, recipe.timesteps, recipe.teacher) == ("flow", "wan2.1", None, "WAN21_T2V")
    assert recipe.sigmas == pytest.approx([1.0, 8 * 0.5 / (1 + 7 * 0.5)], abs=1e-6)
    assert keys and all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert "lora key not loaded" not in comfy.log()[log_before:]


def test_dmd_node_trains_an_eps_teacher_and_stores_its_timesteps(comfy):
    latents, entry = run_latents(comfy, tiny_distill("tiny_sd15.safetensors", SD15, "fastgen/tiny_sd15_dmd", ema_decay=0.9,
                                                     student_timesteps="999, 499"))
    assert len(latents) == 2 and all(torch.isfinite(x).all() for x in latents.values()), latents.keys()
    recipe, keys = lora_recipe(comfy, "fastgen/tiny_sd15_dmd")
    assert (recipe.prediction, recipe.family, recipe.timesteps, recipe.sigmas) == ("eps", "sd15", [999, 499], None)
    assert any(".transformer_blocks." in k for k in keys)
    assert "multistep_sde, sigmas 14.6, 1.61, 0" in node_text(entry, "s")  # SD1.5 sigmas at timesteps 999, 499


def test_dmd_node_refuses_timesteps_that_do_not_fit(comfy):
    message = failure(comfy, tiny_distill("tiny_sd15.safetensors", SD15, "fastgen/never", student_timesteps="999, 499, 99"))
    assert "3 timesteps for 2 student steps" in message


def test_cancel_stops_at_the_next_iteration_and_leaves_a_resumable_checkpoint(comfy):
    """The UI's cancel (POST /interrupt) while the node trains: it stops within an iteration, keeps
    a checkpoint at the iteration reached, writes no LoRA under the final name (an unfinished one
    would look complete to every loader), says on the node and in the log which file holds the
    state and where it stopped; a new run under that name is refused, resuming continues."""
    import struct

    prompt = distill_graph("fastgen/cancelled", iterations=100000)

    async def run_and_cancel():
        import aiohttp

        client_id = uuid.uuid4().hex
        texts = []
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as ws:
            async with http.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                assert response.status == 200
            cancelled_at = None
            while True:
                msg = await ws.receive(timeout=120)
                if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:  # progress text
                    length = struct.unpack(">I", msg.data[4:8])[0]
                    texts.append((msg.data[8:8 + length].decode(), msg.data[8 + length:].decode()))
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                started = event["type"] == "progress" and event["data"].get("node") == "d" and event["data"]["value"] >= 3
                if started and cancelled_at is None:
                    cancelled_at = time.time()
                    async with http.post(f"{comfy.url}/interrupt", json={}) as response:
                        assert response.status == 200
                if event["type"] == "execution_interrupted":
                    return time.time() - cancelled_at, texts
                assert event["type"] != "execution_error", event

    log_before = len(comfy.log())
    seconds, texts = asyncio.run(run_and_cancel())
    assert seconds < 10, f"cancel took {seconds:.1f} s"
    folder = os.path.join(comfy.base, "models", "loras", "fastgen")
    reached = torch.load(os.path.join(folder, "cancelled.fastgen-resume"), weights_only=True)["iteration"]
    assert 3 <= reached < 100000
    assert not os.path.exists(os.path.join(folder, "cancelled.safetensors")), "an unfinished LoRA took the final name"
    said = f"cancelled at iteration {reached} of 100000"
    kept = "models/loras/fastgen/cancelled.fastgen-resume"
    log = comfy.log()[log_before:]
    assert said in log and kept in log and "resume on" in log, log[-2000:]
    assert [node for node, text in texts if said in text and kept in text] == ["d"], texts

    message = failure(comfy, distill_graph("fastgen/cancelled", iterations=reached + 2))
    assert "holds the training state of an earlier run" in message and "turn resume on" in message
    message = failure(comfy, distill_graph("fastgen/cancelled", iterations=reached + 2, resume=True, rank=8))
    assert f"cancelled.fastgen-resume was trained at lora_rank 4 (stopped at iteration {reached})" in message, message
    assert "set lora_rank to 4" in message and "size of tensor" not in message
    _, entry = run_latent(comfy, distill_graph("fastgen/cancelled", iterations=reached + 2, resume=True))
    assert f"{reached + 2} iterations" in node_text(entry, "d")
    assert os.path.isfile(os.path.join(folder, "cancelled.safetensors"))


def test_losses_stream_to_the_page_while_the_node_trains(comfy):
    """The live chart's feed: every iteration's losses arrive over the websocket of the page that
    queued the graph (batched), in order, before the node finishes."""
    entry, events, _ = comfy.run_prompt_watching(distill_graph("fastgen/test_student_live", iterations=8))
    assert "8 iterations" in node_text(entry, "d")
    feed = [e["data"] for e in events if e.get("type") == "fastgen.distill.loss"]
    assert feed and all(d["node"] == "d" and d["iterations"] == 8 for d in feed)
    records = [r for d in feed for r in d["records"]]
    assert [r["iteration"] for r in records] == list(range(1, 9))
    assert all(isinstance(r["fake_score"], float) for r in records)
    # the student updates every update_ratio (2) iterations: its VSD loss comes with those
    assert [r["iteration"] for r in records if r["vsd"] is not None] == [1, 3, 5, 7]


def test_a_run_that_fails_after_training_names_the_state_that_holds_it(comfy):
    """Training done, the LoRA cannot be written (here a folder took its name meanwhile): the error
    names the kept training state and its iteration; resuming saves the LoRA without training
    again. A folder under the name is refused before any training."""
    folder = os.path.join(comfy.base, "models", "loras", "fastgen")
    blocker = os.path.join(folder, "blocked.safetensors")

    async def run_and_block():
        import aiohttp

        client_id = uuid.uuid4().hex
        prompt = distill_graph("fastgen/blocked", iterations=12)
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{comfy.url}/ws?clientId={client_id}") as ws:
            async with http.post(f"{comfy.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as response:
                assert response.status == 200
            while True:
                msg = await ws.receive(timeout=120)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                if event["type"] == "progress" and event["data"].get("node") == "d":
                    os.makedirs(blocker, exist_ok=True)
                if event["type"] == "execution_error":
                    return event["data"]["exception_message"]
                assert event["type"] != "executed" or event["data"]["node"] != "d", "the LoRA was written over a folder"

    message = asyncio.run(run_and_block())
    assert ("The training state of iteration 12 of 12 is kept in models/loras/fastgen/blocked.fastgen-resume: fix the "
            "cause and queue again with resume on (same save_name and lora_rank) to save the LoRA without training again"
            in message), message
    refused = failure(comfy, distill_graph("fastgen/blocked", iterations=12, resume=True))
    assert "blocked.safetensors in" in refused and "is a folder" in refused
    os.rmdir(blocker)
    entry, events, _ = comfy.run_prompt_watching(distill_graph("fastgen/blocked", iterations=12, resume=True))
    assert "12 iterations; saved fastgen/blocked.safetensors" in node_text(entry, "d")
    assert not [e for e in events if e.get("type") == "fastgen.distill.loss"], "it trained again"
