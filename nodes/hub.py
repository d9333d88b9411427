"""FastGen Hub Download: a known student from the Hugging Face Hub into the host's right model folder,
with its recipe beside it, so the student loaders sample it as its authors do.

The work is fastgen_core.hub's; this node picks the host folder (`folder_paths`), shows the download
in bytes on the node's progress bar, lets a Cancel stop it (the Hub cache keeps the part for a
resume) and outputs the file name the loaders take.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..fastgen_core import hub
from .host import save_paths
from .host.recipes import describe

# The loaders' file-name inputs are combos, typed "COMBO" on V3 nodes; io.Combo.Output types itself as its
# option list, which the host's link check refuses there, so the name goes out as a plain "COMBO".
FileName = io.Custom("COMBO")


def _entry(student: str, repo_id: str, filename: str, folder: str) -> hub.HubEntry:
    if student == hub.CUSTOM:
        return hub.custom_entry(repo_id, filename, folder)
    return hub.catalogue_entry(student)


def target_folder(kind: str) -> str:
    """The host's first folder of that kind (models/loras, models/diffusion_models, or the first
    extra path the user configured for it): the only place this node writes."""
    paths = folder_paths.get_folder_paths(kind)
    if not paths:
        raise hub.HubError(f"this ComfyUI has no '{kind}' model folder configured")
    return paths[0]


class FastGenHubDownload(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenHubDownload",
            display_name="FastGen Hub Download",
            category="FastGen/load",
            description="Downloads a known distilled student (lightx2v / CausVid Wan LoRAs, DMD2, SDXL-Lightning, Hyper-SD, TCD, "
            "Qwen-Image-Lightning, FLUX schnell) or any Hub file into the right ComfyUI model folder, checks its sha256 and "
            "writes its sampling recipe beside it (<file>.recipe.json) for FastGen Load Student / Load Student LoRA. "
            "Uses the Hub token from the environment (HF_TOKEN or `hf auth login`); offline it says how to place the file by hand.",
            inputs=[
                io.Combo.Input("student", options=[*hub.catalogue_names(), hub.CUSTOM], default=hub.catalogue_names()[0],
                               tooltip="A student from FastGen's catalogue (pinned file, known folder and recipe), or 'custom' "
                               "for any Hub file given below."),
                io.String.Input("repo_id", default="",
                                tooltip="custom only: the Hub repository, organisation/name (e.g. ByteDance/Hyper-SD)."),
                io.String.Input("filename", default="",
                                tooltip="custom only: the file's path in the repository (.safetensors preferred; no '..', no "
                                "absolute path). Known student names get their recipe."),
                io.Combo.Input("folder", options=list(hub.FOLDERS), default="loras",
                               tooltip="custom only: where it goes — loras (LoRAs) or diffusion_models (full UNets / transformers)."),
            ],
            outputs=[
                FileName.Output(display_name="file_name",
                                tooltip="The file's name in its folder: link it to FastGen Load Student LoRA's lora_name or "
                                "FastGen Load Student's student_name."),
                io.String.Output(display_name="report", tooltip="What was done: the file, its sha256, its recipe."),
            ],
        )

    @classmethod
    def validate_inputs(cls, student: str, repo_id: str, filename: str, folder: str):
        try:
            _entry(student, repo_id, filename, folder)
        except hub.HubError as err:
            return str(err)
        return True

    @classmethod
    def fingerprint_inputs(cls, student: str, repo_id: str, filename: str, folder: str):
        # run again when the file was removed or replaced since the last run (ComfyUI caches outputs by inputs)
        try:
            entry = _entry(student, repo_id, filename, folder)
            stat = os.stat(os.path.join(target_folder(entry.folder), entry.target_name))
            return stat.st_size, stat.st_mtime_ns
        except (hub.HubError, OSError):
            return None

    @classmethod
    def execute(cls, student: str, repo_id: str, filename: str, folder: str) -> io.NodeOutput:
        entry = _entry(student, repo_id, filename, folder)
        bar = comfy.utils.ProgressBar(entry.size or 1)

        def progress(done: int, total: int):
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops the download
            bar.update_absolute(done, max(total, 1))

        placed = hub.fetch(entry, target_folder(entry.folder), progress=progress)
        bar.update_absolute(1, 1)
        if placed.downloaded:
            state = "downloaded"
        elif placed.verified:
            state = "already present, verified"
        else:  # a file of that name that this node did not download, and no published checksum to check it by
            state = "already present, NOT verified (no published sha256; move it away to download it afresh)"
        lines = [f"{placed.name} in {entry.folder}: {state}", f"as {save_paths.shown_path(placed.path)}",
                 f"from {entry.repo_id}/{entry.filename} "
                 f"({(entry.revision or 'main')[:12]}), sha256 {placed.sha256[:16]}…"]
        if entry.recipe is not None:
            lines.append(f"recipe ({entry.student}): {describe(entry.recipe)}")
        else:
            lines.append("no known recipe for this file: the loaders will ask for sampler settings")
        text = "\n".join(lines)
        return io.NodeOutput(placed.name, text, ui=ui.PreviewText(text))
