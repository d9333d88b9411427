"""Every workflow through the host computing in fp16 / bf16, as it does on a GPU.

On the CPU the host computes in fp32 whatever the weights' dtype, and both GPU failures of the
first device run (fp32 LoRA adapters on fp16 activations in the DMD node; see also
test_device_paths.py for the device half) passed here. The test-only node pack makes this host
choose and compute in half precision (FASTGEN_TEST_COMPUTE_DTYPE), so the same mistakes fail here.
"""

import glob
import json
import os
import re

import pytest
from comfy_host import REPO, ComfyServer, find_comfyui
from prompts import runnable_here
from workflow_api import ui_to_api

WORKFLOW_FILES = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}


@pytest.fixture(scope="module", params=list(DTYPES))
def half_comfy(request, host_files):
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    server = ComfyServer(path, extra_models=host_files, env={"FASTGEN_TEST_COMPUTE_DTYPE": request.param}).start()
    server.compute_dtype = request.param
    yield server
    server.stop()


def _short(prompt: dict) -> dict:
    """The prompt with training cut to a few iterations (the graph runs as written otherwise)."""
    for node in prompt.values():
        if node["class_type"] == "FastGenDistillDMD":
            node["inputs"]["iterations"] = 2
    return prompt


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=os.path.basename)
def test_workflow_runs_when_the_host_computes_in_half_precision(half_comfy, path):
    object_info = half_comfy.get("/object_info")
    with open(path) as f:
        workflow = json.load(f)
    entry = half_comfy.run_prompt_from_page(_short(runnable_here(ui_to_api(workflow, object_info))), timeout=600)
    files = half_comfy.output_files(entry)
    assert files and all(os.path.getsize(p) > 0 for p in files)
    if "FastGenWorldSession" in json.dumps(workflow):
        return  # plays its own network beside the host's model management: no host load to check
    # the models really ran in half precision, with no fp32 manual cast
    loads = re.findall(r"model weight dtype (\S+), manual cast: (\S+)", half_comfy.log())
    assert loads and all(dtype == DTYPES[half_comfy.compute_dtype] and cast == "None" for dtype, cast in loads), loads


UNET_WORKFLOWS = [p for p in WORKFLOW_FILES if '"UNETLoader"' in open(p).read()]


@pytest.mark.parametrize("path", UNET_WORKFLOWS, ids=os.path.basename)
def test_workflow_runs_with_fp8_weights(comfy, object_info, path):
    """UNETLoader's weight_dtype fp8_e4m3fn: the weights are stored in fp8 and computed in another
    dtype, so nothing may make tensors in the weights' dtype (the causal loop's RoPE did, on a GPU)."""
    with open(path) as f:
        prompt = runnable_here(ui_to_api(json.load(f), object_info))
    for node in prompt.values():
        if node["class_type"] == "UNETLoader":
            node["inputs"]["weight_dtype"] = "fp8_e4m3fn"
    entry = comfy.run_prompt(prompt, timeout=600)
    assert comfy.output_files(entry)
    assert re.findall(r"model weight dtype torch.float8_e4m3fn, manual cast: torch.float32", comfy.log())
