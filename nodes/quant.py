"""Quantize patch: MODEL -> MODEL on nvidia-modelopt, and quantized models saved and loaded back.

FastGen Quantize Model        MODEL -> MODEL (fp8 / int8 / SmoothQuant / int4 / AWQ / nvfp4), with
                              an optional calibration run on the graph's own conditioning
FastGen Save Quantized Model  the quantized MODEL -> <name>.safetensors in the host's first
                              diffusion_models folder (models/unet on a stock install; compressed
                              weights + modelopt quantizer state, the other weights in their file dtype)
FastGen Load Quantized Model  that file -> the quantized MODEL, with no recalibration

How it meets the host (the design is in fastgen_core/quant/__init__.py): the diffusion model is never
converted. An APPLY_MODEL wrapper routes the selected Linear layers through modelopt quantizers
held beside the model, for the duration of each forward only, and hands them each layer's weight
as the host computes it (`comfy.ops.cast_bias_weight`: device / dtype casting and low-VRAM LoRA
patches included; fully loaded LoRA patches are already baked into the weight). So a LoRA loaded
before or after this node changes what is quantized, clones of the input MODEL are unaffected,
and the host's comfy.ops Linear classes are registered with modelopt (`mtq.register`).
"""

from __future__ import annotations

import json
import logging
import os

import comfy.model_detection
import comfy.model_management
import comfy.ops
import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..fastgen_core import checkpoint, files, quant
from ..fastgen_core.recipe import RECIPE_KEY
from .host import file_dtypes, inputs, save_paths
from .host.embedded import HostDigitDiT, digit_model_from_state_dict
from .host.quantize import ATTACHMENT_KEY, CompactForward, attach, calibration_loop, quantize_layers
from .host.recipes import model_recipe

log = logging.getLogger("fastgen")

FOLDER = "diffusion_models"
SAVE_EXAMPLE = "fastgen/my_model_fp8"


class FastGenQuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenQuantizeModel",
            display_name="FastGen Quantize Model",
            category="FastGen/patch",
            description="Quantizes the transformer / UNet layers of any MODEL with NVIDIA ModelOpt. Real low-precision "
            "GEMMs where the GPU has them (fp8: SM >= 8.9; int8: SM >= 8.0), elsewhere fake-quant (the format's "
            "accuracy, no speedup). LoRAs before or after this node keep working. "
            "The report says which route runs: a real GEMM or fake-quant.",
            inputs=[
                io.Model.Input("model", tooltip="Any MODEL the host runs (Wan, Flux, SD, the embedded models...)."),
                io.Combo.Input("format", options=list(quant.FORMATS), default="fp8",
                               tooltip="; ".join(f"{f.name}: {f.description}" for f in quant.FORMATS.values())),
                io.String.Input("layers", default="", tooltip="Empty: the architecture's transformer-block layers "
                                "(embeddings, timestep / modulation MLPs, Linear(1, d), the final projection and norms stay "
                                "in high precision). Or comma-separated globs over Linear layer names, e.g. "
                                "'blocks.*.ffn.*, blocks.*.self_attn.*'; a glob that matches nothing is an error."),
                io.Boolean.Input("calibrate", default=False, tooltip="Off: calibration-free dynamic scaling (per call). "
                                 "On: run `steps` sampling steps on `positive` + `latent` to fix activation ranges (and "
                                 "search SmoothQuant / AWQ scales, which need it). On an fp8 GPU fixed ranges are also faster "
                                 "(no per-call range pass; measured in benchmarks/RESULTS.md)."),
                io.Int.Input("steps", default=4, min=1, max=50, tooltip="Sampling steps of the calibration run."),
                io.Conditioning.Input("positive", optional=True, tooltip="Conditioning for the calibration run."),
                io.Latent.Input("latent", optional=True, tooltip="A latent of the size you will sample (calibration run)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, tooltip="Noise seed of the calibration run."),
            ],
            outputs=[
                io.Model.Output(tooltip="The quantized MODEL (the input MODEL is unchanged)."),
                io.String.Output(display_name="report", tooltip="Layers quantized and which route runs (a real GEMM or fake-quant)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, format: str = "fp8"):
        return inputs.widget_problem(cls, format=format) or True

    @classmethod
    def execute(cls, model, format: str, layers: str, calibrate: bool, steps: int, positive=None, latent=None,
                seed: int = 0) -> io.NodeOutput:
        fmt = quant.get_format(format)
        quant.check_format_runs(fmt, model.load_device)
        if fmt.needs_calibration and not calibrate:
            raise ValueError(f"{format} searches its scales on real activations: turn calibrate on and connect positive + latent")
        if calibrate and (positive is None or latent is None):
            raise ValueError("calibrate needs the positive conditioning and a latent to sample from: connect both, or turn it off")
        bank = quantize_layers(model.model.diffusion_model, format, layers)
        patched, _ = attach(model, bank)
        if calibrate:
            comfy.model_management.load_models_gpu([patched])
            bank.calibrate(calibration_loop(patched, positive, latent, steps, seed))
        patched, text = attach(model, bank)
        log.info("FastGen Quantize: %s", text.replace("\n", "; "))
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))


def values_state_dict(diffusion_model, bank) -> dict:
    """The model's weights, compact layers' codes turned back into values."""
    state_dict = diffusion_model.state_dict()
    for name in bank.layers:
        module = diffusion_model.get_submodule(name)
        if getattr(module, "compact_format", None):
            dtype = module.bias.dtype if module.bias is not None else torch.float32
            state_dict[f"{name}.weight"] = quant.dequantized(module, state_dict[f"{name}.weight"], dtype)
            state_dict.pop(f"{name}.weight_scale", None)
    return state_dict


def network_metadata(model) -> dict[str, str]:
    """What a loader needs to rebuild the model: the FastGen network config for our embedded
    models (the host's own models are recognised from their keys), and the recipe."""
    metadata = {}
    diffusion_model = model.model.diffusion_model
    if isinstance(diffusion_model, HostDigitDiT):
        metadata[checkpoint.NETWORK_KEY] = json.dumps({"arch": "DigitDiT", "config": diffusion_model.config.to_dict()}, sort_keys=True)
    recipe = model_recipe(model)
    if recipe is not None:
        metadata[RECIPE_KEY] = recipe.to_json()
    return metadata


class FastGenSaveQuantizedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenSaveQuantizedModel",
            display_name="FastGen Save Quantized Model",
            category="FastGen/patch",
            description="Saves a MODEL from FastGen Quantize Model into the first folder ComfyUI lists for diffusion models "
            "(models/unet on a stock install, listed together with models/diffusion_models; the node shows the full path): "
            "the quantized layers compressed (fp8 / int8: 1 byte per weight, int4: half a byte) with their modelopt "
            "quantizer state, the other weights in the dtype their file had, LoRAs applied before saving baked in. "
            "FastGen Load Quantized Model loads it back without recalibration.",
            inputs=[
                io.Model.Input("model", tooltip="The output of FastGen Quantize Model (or of the loader)."),
                io.String.Input("save_name", default="fastgen/quantized_model", tooltip="Relative to the first "
                                "diffusion_models folder (models/unet on a stock install); '.safetensors' is added. No '..' "
                                "or absolute paths."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name."),
            ],
            outputs=[io.String.Output(display_name="file_name", tooltip="The saved file, as the loader lists it (the "
                                      "node's text shows its full path).")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, save_name: str):  # only save_name: the host checks the others (not with **kwargs)
        return save_paths.save_name_problem(save_name, SAVE_EXAMPLE)

    @classmethod
    def execute(cls, model, save_name: str, overwrite: bool) -> io.NodeOutput:
        bank = model.attachments.get(ATTACHMENT_KEY)
        quant.import_mtq()
        if bank is None:
            raise ValueError("this MODEL is not quantized: connect the output of FastGen Quantize Model")
        path = save_paths.resolve_save_path(save_name, FOLDER, SAVE_EXAMPLE, overwrite,
                                            "choose another save_name, or turn overwrite on")
        comfy.model_management.load_models_gpu([model], force_patch_weights=True)  # LoRA patches baked in
        state_dict = values_state_dict(model.model.diffusion_model, bank)
        # the quantized weights are compressed from their full values; the rest go back as they came
        state_dict, how = file_dtypes.as_loaded(model.model, state_dict, keep={f"{name}.weight" for name in bank.layers})
        quant.save_quantized(path, state_dict, bank, metadata=network_metadata(model))
        name = save_paths.listed_name(path, FOLDER)
        size = os.path.getsize(path) / 2**20
        text = (f"saved {name} ({size:.1f} MiB) as {save_paths.shown_path(path)}: {bank.format.name} on {len(bank.layers)} "
                f"layers, the other weights {how}")
        return io.NodeOutput(name, ui=ui.PreviewText(text))


def quantized_files() -> list[str]:
    """Files in the diffusion_models folders that FastGen Save Quantized Model wrote (header check only)."""
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        if name.endswith(".safetensors"):
            try:
                if quant.QUANT_KEY in files.read_metadata(folder_paths.get_full_path(FOLDER, name)):
                    names.append(name)
            except (OSError, ValueError):
                continue
    return names


def build_model(tensors: dict, metadata: dict, path: str):
    if checkpoint.NETWORK_KEY in metadata:
        arch, config, recipe = checkpoint.network_info(path)
        return digit_model_from_state_dict(arch, config, recipe, tensors, path)
    dtypes = file_dtypes.of(tensors, comfy.model_detection.unet_prefix_from_state_dict(tensors))
    model = comfy.sd.load_diffusion_model_state_dict(tensors)
    if model is None:
        raise ValueError(f"ComfyUI does not recognise the model in {os.path.basename(path)}")
    file_dtypes.remember(model.model, dtypes)
    return model


class FastGenLoadQuantizedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenLoadQuantizedModel",
            display_name="FastGen Load Quantized Model",
            category="FastGen/patch",
            description="Loads a model saved by FastGen Save Quantized Model: the host rebuilds the architecture from "
            "its keys, the quantizers are restored from the saved modelopt state (no calibration run).",
            inputs=[
                io.Combo.Input("model_name", options=quantized_files(), tooltip="Quantized FastGen files in the "
                               "diffusion_models folders (models/unet, models/diffusion_models; other files are not listed)."),
                io.Boolean.Input("compact", default=True, tooltip="On: fp8 / int8 layers stay compressed in memory "
                                 "(half of bf16), int4 ones as packed codes (a quarter), dequantized on the fly or fed "
                                 "straight to the fp8 / int8 GEMM; a LoRA "
                                 "applied after this node is added with the saved scales (values beyond the saved range "
                                 "saturate). Off: decompressed to their saved precision (more memory; bit-identical to "
                                 "the saved model, LoRAs keep their full range)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The quantized MODEL."),
                io.String.Output(display_name="report", tooltip="Layers quantized and which route runs."),
            ],
        )

    @classmethod
    def execute(cls, model_name: str, compact: bool = True) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, model_name)
        quant.import_mtq()  # the clear "install nvidia-modelopt" error first
        tensors, info, state, metadata = quant.load_quantized(path)
        quant.check_format_runs(quant.get_format(info["format"]), comfy.model_management.get_torch_device())
        model = build_model(tensors, metadata, path)
        diffusion_model = model.model.diffusion_model
        bank = quant.restore_quantizers(diffusion_model, info, state)
        lines = [f"loaded {model_name}"]
        if compact:
            before = quant.layer_memory(diffusion_model, bank.layers, bank.format.weight_bits)[0]
            done = quant.compact_layers(diffusion_model, bank, info.get("weight_ranges"))
            for name in done:
                diffusion_model.get_submodule(name).forward = CompactForward(diffusion_model.get_submodule(name))
            after = quant.layer_memory(diffusion_model, bank.layers, bank.format.weight_bits)[0]
            model.size = 0  # the host's memory estimate, recomputed for the smaller weights
            model.model_size()
            if done:
                kinds = "/".join(sorted({diffusion_model.get_submodule(n).compact_format for n in done}))
                lines.append(f"compact: {len(done)} layers held as {kinds} codes, {after / 2**20:.1f} MiB instead of "
                             f"{before / 2**20:.1f} MiB ({before / max(after, 1):.1f}x smaller), dequantized on the fly")
            else:
                lines.append(f"compact: not for {bank.format.name} (no compact codes for it); layers decompressed")
        patched, text = attach(model, bank)
        text = "\n".join([*lines, text])
        return io.NodeOutput(patched, text, ui=ui.PreviewText(text))

