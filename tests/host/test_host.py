"""The pack inside a real ComfyUI (v0.3.64) on CPU: registration, workflows, native-model behaviour."""

import copy
import glob
import json
import os

import numpy as np
import pytest
import torch
from comfy_host import PACK_NAME, REPO
from prompts import basic_scheduler, custom_sampler_prompt, images, load_workflow, read_png, runnable_here, teacher_prompt
from workflow_api import missing_node_types, ui_to_api

WORKFLOW_FILES = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))


def pack_node_ids():
    import ast

    ids = []
    for path in glob.glob(os.path.join(REPO, "nodes", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.keyword) and node.arg == "node_id" and isinstance(node.value, ast.Constant):
                ids.append(node.value.value)
    return sorted(ids)


def test_every_node_registers_without_import_errors(comfy, object_info):
    ids = pack_node_ids()
    assert ids, "found no node_id in nodes/"
    missing = [i for i in ids if i not in object_info]
    assert not missing, f"nodes not registered: {missing}"
    for i in ids:
        assert object_info[i]["category"].startswith("FastGen/"), i
        assert object_info[i]["description"], f"{i} has no description"
    log = comfy.log().split("got prompt")[0]  # start-up only: later tests provoke warnings on purpose
    assert f"Cannot import {comfy.base}" not in log and "IMPORT FAILED" not in log.split(PACK_NAME)[-1].split("\n")[0]
    lines = [line for line in log.splitlines() if PACK_NAME in line or "fastgen" in line.lower()]
    bad = [line for line in lines if any(w in line.lower() for w in ("error", "warning", "traceback", "failed"))]
    assert not bad, bad


def test_loader_lists_only_fastgen_networks(object_info):
    options = object_info["FastGenLoadModel"]["input"]["required"]["model_name"][1]["options"]
    assert "embedded/digit_teacher.safetensors" in options
    assert not any("corrupt" in o or "foreign" in o for o in options), options


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=os.path.basename)
def test_workflow_converts_and_runs(comfy, object_info, path):
    with open(path) as f:
        workflow = json.load(f)
    assert missing_node_types(workflow, object_info) == []
    # with a page's websocket open, as a user queues it (the World Session refuses a prompt nobody watches)
    entry = comfy.run_prompt_from_page(runnable_here(ui_to_api(workflow, object_info)))
    files = comfy.output_files(entry)
    assert files and all(os.path.getsize(p) > 0 for p in files)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=os.path.basename)
def test_workflow_loads_in_the_real_page_without_missing_nodes(comfy, path):
    import asyncio

    from browser import Browser, find_chromium, load_workflow_in_page, page_errors

    if find_chromium() is None:
        pytest.skip("no Chromium for the page test (apt-get install chromium)")
    with open(path) as f:
        workflow = json.load(f)

    async def check():
        browser = await Browser().session()
        try:
            missing = await load_workflow_in_page(browser, comfy.url, workflow)
            count = await browser.evaluate("window.app.graph._nodes.length")
            return missing, count, await page_errors(browser)
        finally:
            await browser.close()

    missing, count, errors = asyncio.run(check())
    assert missing == [] and count == len(workflow["nodes"])
    assert errors == [], f"the page reported errors loading {os.path.basename(path)}: {errors}"


def test_teacher_workflow_draws_the_requested_digits(comfy, object_info):
    from fastgen_core.eval import load_classifier, predict

    prompt = ui_to_api(load_workflow("embedded_teacher.json"), object_info)
    files = sorted(comfy.output_files(comfy.run_prompt(prompt)))
    assert len(files) == 10
    drawn = torch.tensor(np.stack([read_png(p) for p in files]))[:, None]  # [10, 1, 32, 32]
    predicted = predict(load_classifier(), drawn[..., 2:-2, 2:-2])
    correct = (predicted == torch.arange(10)).sum().item()
    assert correct >= 9, f"teacher drew {predicted.tolist()} for digits 0..9"


def test_same_seed_same_image_and_lora_changes_it(comfy, object_info):
    prompt, ids = teacher_prompt(object_info)
    base = images(comfy, prompt)
    again = images(comfy, copy.deepcopy(prompt))
    assert np.array_equal(base, again), "the same seed gave different images"

    lora = copy.deepcopy(prompt)
    lora["100"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": [ids["FastGenLoadModel"], 0], "lora_name": "digit_test_lora.safetensors", "strength_model": 1.0}}
    lora[ids["KSampler"]]["inputs"]["model"] = ["100", 0]
    with_lora = images(comfy, lora)
    assert np.abs(with_lora - base).mean() > 0.01, "the host's LoraLoader had no effect on the FastGen model"


def test_easycache_and_sampler_custom_advanced_run_on_the_native_model(comfy, object_info):
    # cfg 1: one cond chunk per model call. The host's EasyCache (v0.3.64) adds each chunk's cached
    # diff to the whole batch, so with cond and uncond batched together it breaks on any model.
    prompt, ids = teacher_prompt(object_info, cfg=1.0)
    base = images(comfy, prompt)

    def easycache(model):
        return {"class_type": "EasyCache", "inputs": {"model": model, "reuse_threshold": 0.2, "start_percent": 0.15,
                                                      "end_percent": 0.95, "verbose": False}}

    custom = custom_sampler_prompt(prompt, ids, {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
                                   basic_scheduler(8), cfg=1.0, model_patch=easycache)
    cached = images(comfy, custom)
    assert cached.shape == base.shape
    skipped = [line for line in comfy.log().splitlines() if "EasyCache - skipped" in line]
    assert skipped and not skipped[-1].startswith("EasyCache - skipped 0/"), skipped
    # EasyCache approximates the skipped steps: the image stays close to the uncached one.
    assert 0 < np.abs(cached - base).mean() < 0.05


def test_sampling_shows_progress_and_previews_on_the_page(comfy, object_info):
    prompt, ids = teacher_prompt(object_info, seed=11)
    _, events, previews = comfy.run_prompt_watching(prompt)
    progress = [e["data"] for e in events if e.get("type") == "progress" and e["data"].get("node") == ids["KSampler"]]
    assert [p["value"] for p in progress][-1] == 8 and all(p["max"] == 8 for p in progress), progress
    assert previews >= 4, f"only {previews} preview frames reached the page"


def test_bad_digits_are_rejected_with_a_clear_message(comfy, object_info):
    prompt, ids = teacher_prompt(object_info)
    prompt[ids["FastGenDigitConditioning"]]["inputs"]["digits"] = "12x"
    status, body = comfy.post("/prompt", {"prompt": prompt})
    assert status == 400
    assert "'x'" in json.dumps(body), body


def test_page_shows_the_recipe_on_the_nodes_after_a_run(comfy):
    """web/js/fastgen_info.js: after a run from the page, the student nodes show what they report."""
    import asyncio

    from browser import Browser, find_chromium, queue_from_page

    if find_chromium() is None:
        pytest.skip("no Chromium for the page test (apt-get install chromium)")
    workflow = load_workflow("embedded_student.json")
    for node in workflow["nodes"]:
        if node["type"] == "FastGenStudentSampler":
            node["widgets_values"][0] = 1234  # a seed no other test used: the run is not cached

    async def run():
        from browser import load_workflow_in_page

        browser = await Browser().session()
        try:
            assert await load_workflow_in_page(browser, comfy.url, workflow) == []
            await queue_from_page(browser, comfy)
            return json.loads(await browser.evaluate(
                "JSON.stringify(Object.fromEntries(window.app.graph._nodes.map(n => "
                "[n.type, n.widgets?.find(w => w.name === 'fastgen_info')?.element?.value ?? null])))"))
        finally:
            await browser.close()

    shown = asyncio.run(run())
    # (the loader's own box is filled only when it runs; an earlier test's run of the same graph is cached)
    assert shown["FastGenStudentSampler"].startswith("4 steps, cfg 1, multistep_sde, sigmas 0.999, 0.75, 0.5, 0.25, 0"), shown


def test_dmd_node_draws_its_losses_live_in_the_page(comfy):
    """The DMD workflow queued from the page (6 iterations): the chart on the node receives every
    iteration's losses while it trains and draws them."""
    import asyncio
    import uuid

    from browser import Browser, find_chromium, load_workflow_in_page, page_errors, queue_from_page

    if find_chromium() is None:
        pytest.skip("no Chromium for the page test (apt-get install chromium)")
    workflow = load_workflow("distill_dmd_lora.json")
    for node in workflow["nodes"]:
        if node["type"] == "FastGenDistillDMD":
            node["widgets_values"][1] = 6  # iterations
            node["widgets_values"][6] = 2  # batch size
            node["widgets_values"][9] = f"fastgen/page_chart_{uuid.uuid4().hex[:8]}"  # a new save name: never overwritten
    comfy.post("/settings/Comfy.TutorialCompleted", True)
    node_js = "window.app.graph._nodes.find(n => n.type === 'FastGenDistillDMD')"

    async def run():
        browser = await Browser().session()
        try:
            assert await load_workflow_in_page(browser, comfy.url, workflow) == []
            assert await browser.evaluate(f"!!{node_js}.fastgenLossChart")
            await queue_from_page(browser, comfy, timeout=240)
            records = await browser.evaluate(f"{node_js}.fastgenLossChart.records.map(r => r.iteration)")
            label = await browser.evaluate(f"{node_js}.fastgenLossChart.info.textContent")
            # something was drawn: the canvas has pixels of the two series' colours
            drawn = await browser.evaluate(f"(() => {{ const c = {node_js}.fastgenLossChart.canvas; "
                                           "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; "
                                           "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()")
            return records, label, drawn, await page_errors(browser)
        finally:
            await browser.close()

    records, label, drawn, errors = asyncio.run(run())
    assert records == [1, 2, 3, 4, 5, 6]
    assert label.startswith("iteration 6 / 6 · fake score") and "student VSD" in label, label
    assert drawn > 100, f"the chart drew {drawn} pixels"
    assert errors == [], errors
