"""Student files -> plain state dicts, and what kind of weights they hold.

Distilled students reach users as full checkpoints (safetensors, FastGen/PyTorch `.pth`, diffusers
folders' `diffusion_pytorch_model.safetensors`) or as LoRAs in one of the three key layouts the host
loads. This module reads them without running any code from the file and answers the questions a
loader asks before it hands weights to the host:

- is it a LoRA, and in which key format (`comfy`: `diffusion_model.<m>.lora_up/lora_down`, `peft`:
  `<prefix>.<m>.lora_A/lora_B`, `kohya`: `lora_unet_<m_with_underscores>.lora_up/lora_down`)?
- which modules does a LoRA target, and do they exist in the model it is applied to?
- is a full checkpoint in the diffusers layout (the host converts those with its own tables)?
- which model family do the keys look like?

Only safetensors and `torch.load(weights_only=True)` are used: a pickle that needs code to load is
refused with a message, never executed.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import files

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pth", ".pt", ".ckpt", ".bin")
LORA_FORMATS = ("comfy", "peft", "kohya")

# Where checkpoints written by training frameworks keep the network: FastGen saves
# {"model": {"net": ...}, "iteration": N}; others use "state_dict", "ema", "module". EMA weights are
# what students are sampled with, so they win when both are present.
_CHECKPOINT_CONTAINERS = ("model", "state_dict", "module", "net")
_EMA_NAMES = ("net_ema", "ema", "model_ema", "ema_model")

# Prefixes that wrap diffusion-model keys in full checkpoints and PEFT LoRAs.
_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.", "model.", "net.")

# A LoRA layer's weights: `<module>.lora_up/lora_down` (comfy, kohya), `<module>.lora_B/lora_A` (PEFT,
# diffusers), optionally `.default` (PEFT adapters saved without merging names).
_LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.(?P<part>lora_up|lora_down|lora_mid|lora_A|lora_B)(\.default)?\.weight$")
_KOHYA_PREFIX = "lora_unet_"


class StudentFileError(ValueError):
    """A student file that cannot be used, with the reason and the file named."""

    # ComfyUI shows an error as "<module>.<class>: message"; the pack's install path is noise there.
    __module__ = "fastgen"


@dataclass
class StudentFile:
    path: str
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    container: str = "safetensors"  # "safetensors" or "pickle (weights only)"


def load_student_file(path: str) -> StudentFile:
    """Read a student checkpoint or LoRA into a flat {key: tensor} dict on the CPU."""
    lower = path.lower()
    if lower.endswith(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS) and not os.path.isfile(path):
        raise StudentFileError(f"student file not found: {path}")
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        try:
            metadata = files.read_metadata(path)
        except ValueError as err:
            raise StudentFileError(str(err)) from None
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError) as err:
            raise StudentFileError(f"{path}: cannot read tensors (corrupt or truncated?): {err}") from None
        return StudentFile(path, _check_tensors(state_dict, path), metadata, "safetensors")
    if lower.endswith(PICKLE_EXTENSIONS):
        return StudentFile(path, _check_tensors(unwrap_checkpoint(_load_weights_only(path), path), path), {}, "pickle (weights only)")
    raise StudentFileError(
        f"{path}: unsupported student file type; use {', '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)} "
        "(safetensors preferred: it cannot carry code)"
    )


def _load_weights_only(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global that is not a tensor, a container or a plain number; a
        # file that needs one (an optimizer class, a config object, or a payload) is not loaded.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StudentFileError(
            f"{path}: refused to load. The file is a pickle that needs code to unpickle ({first_line}); "
            "FastGen only loads plain tensors from .pth files (torch.load weights_only=True). "
            "Convert it to safetensors with the tool that made it, or re-save only its state_dict."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise StudentFileError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {err}") from None


def unwrap_checkpoint(obj, source: str) -> dict[str, torch.Tensor]:
    """The network's flat state dict inside a training checkpoint (EMA weights first)."""
    if _is_flat_state_dict(obj):
        return _prefer_ema_prefix(obj)
    if isinstance(obj, dict):
        for name in _EMA_NAMES + _CHECKPOINT_CONTAINERS:
            if name in obj and isinstance(obj[name], dict) and obj[name]:
                try:
                    return unwrap_checkpoint(obj[name], source)
                except StudentFileError:
                    continue
        tensor_dicts = [v for v in obj.values() if _is_flat_state_dict(v)]
        if len(tensor_dicts) == 1:
            return _prefer_ema_prefix(tensor_dicts[0])
    found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise StudentFileError(f"{source}: no network weights found in the checkpoint (top level: {found})")


def _is_flat_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _prefer_ema_prefix(state_dict: dict) -> dict:
    """FastGen's model state_dict holds both `net.*` and `net_ema.*`: keep the EMA copy, unprefixed."""
    for prefix in ("net_ema.", "net."):
        picked = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state_dict


def _check_tensors(state_dict: dict, source: str) -> dict:
    if not state_dict:
        raise StudentFileError(f"{source}: the file holds no tensors")
    return state_dict


def strip_model_prefix(key: str) -> str:
    for prefix in _MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# ---------------------------------------------------------------------------------------- LoRA


def lora_format(state_dict) -> str | None:
    """'comfy', 'peft' or 'kohya' for a LoRA state dict (or its keys); None when it is not a LoRA."""
    parts = {(m.group("module"), m.group("part")) for m in map(_LORA_WEIGHT.match, state_dict) if m}
    if not parts:
        return None
    if any(module.startswith(_KOHYA_PREFIX) for module, _ in parts):
        return "kohya"
    if any(part in ("lora_A", "lora_B") for _, part in parts):
        return "peft"
    return "comfy"


def lora_module_names(state_dict) -> list[str]:
    """The module names a LoRA's keys carry, as written in the file (prefix included).

    These are the names the host's LoRA key map is keyed by (`diffusion_model.blocks.0.self_attn.q`,
    `lora_unet_blocks_0_self_attn_q`, `transformer.blocks.0.attn1.to_q`, ...).
    """
    names = sorted({m.group("module") for m in map(_LORA_WEIGHT.match, state_dict) if m})
    if not names:
        raise StudentFileError("not a LoRA: no lora_up/lora_down or lora_A/lora_B weights")
    return names


def lora_layer_shape(state_dict, module: str) -> tuple[int, int] | None:
    """(out_features, in_features) of the weight a LoRA layer patches: up/B rows, down/A columns."""
    up = _first_present(state_dict, [f"{module}.{p}.weight" for p in ("lora_up", "lora_B", "lora_B.default")])
    down = _first_present(state_dict, [f"{module}.{p}.weight" for p in ("lora_down", "lora_A", "lora_A.default")])
    if up is None or down is None:
        return None
    return int(up.shape[0]), int(down.shape[1])


def _first_present(state_dict, keys):
    return next((state_dict[k] for k in keys if k in state_dict), None)


def generic_lora_names(model_weight_shapes: dict) -> dict[str, tuple]:
    """LoRA module name -> weight shape for a model's `<module>.weight` keys, in the two generic forms
    the host accepts for any architecture: `diffusion_model.<module>` and `lora_unet_<module_>`."""
    names = {}
    for key, shape in model_weight_shapes.items():
        if key.endswith(".weight") and len(shape) >= 2:
            module = strip_model_prefix(key)[: -len(".weight")]
            names[f"diffusion_model.{module}"] = tuple(shape)
            names[_KOHYA_PREFIX + module.replace(".", "_")] = tuple(shape)
    return names


def check_lora_fits(lora_state_dict, accepted: dict, lora_name: str = "LoRA", model_name: str = "the model",
                    model_family: str | None = None) -> list[str]:
    """Check a LoRA against the modules a model accepts; return the LoRA modules the model lacks.

    `accepted` maps every LoRA module name the model accepts to the shape of the weight it patches
    (the host's LoRA key map, or `generic_lora_names`). Raises when nothing fits, naming the family
    each side looks like (a LoRA for another architecture), or when layers match by name but not by
    size (a LoRA for another size of the same family, e.g. Wan 14B on Wan 1.3B).
    """
    modules = lora_module_names(lora_state_dict)
    matched = [m for m in modules if m in accepted]
    missing = [m for m in modules if m not in accepted]
    if not matched:
        lora_family = guess_family(modules) or "an unknown architecture"
        model_family = model_family or guess_family(accepted) or "an unknown architecture"
        raise StudentFileError(
            f"{lora_name} does not fit {model_name}: none of its {len(modules)} layers exist in the model "
            f"(e.g. '{modules[0]}'). The LoRA looks made for {lora_family}; the model is {model_family}. "
            "Apply it to the model family it was trained for."
        )
    wrong_size = []
    for module in matched:
        shape, target = lora_layer_shape(lora_state_dict, module), accepted[module]
        if shape is not None and target is not None and len(target) >= 2 and shape != (int(target[0]), int(target[1])):
            wrong_size.append((module, shape, tuple(target[:2])))
    if wrong_size:
        module, shape, target = wrong_size[0]
        raise StudentFileError(
            f"{lora_name} does not fit {model_name}: {len(wrong_size)} of its layers have other sizes "
            f"(e.g. '{module}' patches a {shape[0]}x{shape[1]} weight, the model's is {target[0]}x{target[1]}). "
            "It was made for another size of this model family."
        )
    return missing


# ------------------------------------------------------------------------ layouts and families

# Key fragments that identify a family, most specific first. Keys are compared without the
# `diffusion_model.` / `model.diffusion_model.` prefixes, so native checkpoints and LoRAs both match.
_FAMILY_HINTS = (
    ("wan", ("head.modulation", "blocks.0.self_attn.q", "blocks.0.cross_attn.k", "text_embedding.0", "patch_embedding")),
    ("flux", ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mod.lin")),
    ("qwen-image", ("transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.add_q_proj", "img_in")),
    ("sdxl", ("label_emb.0.0", "input_blocks.4.1.transformer_blocks.1", "add_embedding.linear_1",
              "down_blocks.1.attentions.0.transformer_blocks.1")),
    ("sd15", ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "down_blocks.0.attentions.0", "input_blocks.0.0")),
    ("fastgen-digits", ("class_embed", "final_ada", "blocks.0.ada", "blocks.0.qkv", "blocks.0.fc1")),
)


def guess_family(keys) -> str | None:
    """A best guess at the model family from weight keys or LoRA module names (None when unsure).

    Names are compared with dots turned into underscores, so kohya names (`lora_unet_blocks_0_...`)
    match the same hints as native keys.
    """
    names = [_underscored(k) for k in keys]
    for family, hints in _FAMILY_HINTS:
        for hint in hints:
            hint = hint.replace(".", "_")
            if any(name.startswith(hint) or f"_{hint}" in name for name in names):
                return family
    return None


def _underscored(key: str) -> str:
    key = strip_model_prefix(key)
    for prefix in (_KOHYA_PREFIX, "lora_transformer_", "lycoris_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace(".", "_")


def diffusers_layout(state_dict) -> str | None:
    """'unet' or 'transformer' for diffusers-layout checkpoints; None for native keys.

    The host converts diffusers UNets (SD1.5 / SDXL sizes) and Flux / SD3 transformers itself;
    this only tells a loader what to say when the host cannot (e.g. diffusers-layout Wan).
    """
    keys = [strip_model_prefix(k) for k in state_dict]
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys) and any(k.startswith("time_embedding.") for k in keys):
        return "unet"
    transformer_markers = (
        "condition_embedder.", "blocks.0.attn1.to_q",  # Wan
        "single_transformer_blocks.", "x_embedder.",  # Flux
        "transformer_blocks.0.attn.add_q_proj",  # SD3 (Qwen-Image's native keys look alike, so SD3 needs pos_embed too)
    )
    if any(k.startswith(transformer_markers[:4]) for k in keys):
        return "transformer"
    if any(k.startswith(transformer_markers[4]) for k in keys) and any(k.startswith("pos_embed.proj") for k in keys):
        return "transformer"
    return None


# Diffusers' WanTransformer3DModel names -> the original Wan names ComfyUI loads. ComfyUI v0.3.64
# converts diffusers UNets and Flux / SD3 transformers itself but not Wan, while Wan students
# trained with diffusers (FastGen's own Wan recipes among them) are saved in its layout.
_WAN_DIFFUSERS_RENAMES = (
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
)
_WAN_DIFFUSERS_BLOCK_RENAMES = (
    ("attn1.to_q.", "self_attn.q."), ("attn1.to_k.", "self_attn.k."), ("attn1.to_v.", "self_attn.v."),
    ("attn1.to_out.0.", "self_attn.o."), ("attn1.norm_q.", "self_attn.norm_q."), ("attn1.norm_k.", "self_attn.norm_k."),
    ("attn2.to_q.", "cross_attn.q."), ("attn2.to_k.", "cross_attn.k."), ("attn2.to_v.", "cross_attn.v."),
    ("attn2.to_out.0.", "cross_attn.o."), ("attn2.norm_q.", "cross_attn.norm_q."), ("attn2.norm_k.", "cross_attn.norm_k."),
    ("attn2.add_k_proj.", "cross_attn.k_img."), ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the affine norm before cross-attention: the original norm3
    ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
)
_WAN_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def wan_diffusers_to_native(state_dict: dict) -> dict:
    """A diffusers-layout Wan 2.1 / 2.2 transformer state dict under the original Wan names."""
    converted = {}
    for key, tensor in state_dict.items():
        key = strip_model_prefix(key)
        if key == "scale_shift_table":
            new = "head.modulation"
        elif match := _WAN_BLOCK_KEY.match(key):
            index, rest = match.groups()
            if rest == "scale_shift_table":
                rest = "modulation"
            for old, replacement in _WAN_DIFFUSERS_BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = replacement + rest[len(old):]
                    break
            new = f"blocks.{index}.{rest}"
        else:
            new = next((replacement + key[len(old):] for old, replacement in _WAN_DIFFUSERS_RENAMES if key.startswith(old)), key)
        converted[new] = tensor
    return converted
