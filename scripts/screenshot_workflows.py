"""Screenshots of each workflow as ComfyUI's page shows it, after running it, for the README.

    COMFYUI_PATH=~/ComfyUI .venv/bin/python scripts/screenshot_workflows.py [workflow names, default all]

Starts the host (tests/host), runs each workflow, loads it in headless Chromium and writes
docs/<name>_workflow.png, plus docs/<name>_output.png: the images the workflow saved, as a grid.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "host")]

from browser import Browser, fit_view, load_workflow_in_page, queue_from_page  # noqa: E402
from comfy_host import ComfyServer, find_comfyui  # noqa: E402
from workflow_api import ui_to_api  # noqa: E402


def save_output_grid(files, out_path):
    import numpy as np
    import torch
    from PIL import Image

    from fastgen_core.images import make_grid, write_png

    images = torch.tensor(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in sorted(files)]))
    write_png(out_path, make_grid(images.permute(0, 3, 1, 2), rows=1), scale=4)


def unavailable_choices(prompt, object_info):
    """(node type, input, value) for every list choice the host does not offer (a model file it lacks)."""
    missing = []
    for node in prompt.values():
        info = object_info[node["class_type"]]["input"]
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if not spec or isinstance(value, list):
                continue
            options = spec[0] if isinstance(spec[0], list) else (spec[1].get("options") if spec[0] == "COMBO" else None)
            if options is not None and value not in options:
                missing.append((node["class_type"], name, value))
    return missing


async def main():
    path, reason = find_comfyui()
    if path is None:
        sys.exit(reason)
    server = ComfyServer(path).start()
    browser = None
    try:
        object_info = server.get("/object_info")
        server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog
        server.post("/settings/Comfy.Minimap.Visible", False)
        browser = await Browser(width=1600, height=900).session()
        for wf_path in sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json"))):
            name = os.path.splitext(os.path.basename(wf_path))[0]
            if sys.argv[1:] and name not in sys.argv[1:]:
                continue
            with open(wf_path) as f:
                workflow = json.load(f)
            # Workflows for users' own models (Wan, ...) need files this host lacks: those are shown
            # as loaded, not run.
            runnable = not unavailable_choices(ui_to_api(workflow, object_info), object_info)
            missing = await load_workflow_in_page(browser, server.url, workflow)
            if missing:
                raise SystemExit(f"{name}: the page shows missing nodes {missing}")
            if runnable:
                # run from the page itself (not cached by an earlier API run), so every node reports
                # to the page what it shows after a run
                await queue_from_page(browser, server)
                history = server.get("/history?max_items=1")
                [entry] = history.values()
                saved = [f for f in server.output_files(entry) if os.sep + "output" + os.sep in f]  # not temp previews
                save_output_grid(saved, os.path.join(ROOT, "docs", f"{name}_output.png"))
            await fit_view(browser)
            await browser.screenshot(os.path.join(ROOT, "docs", f"{name}_workflow.png"))
            print("wrote", name)
    finally:
        if browser is not None:
            await browser.close()
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
