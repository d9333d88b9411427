"""Quantized model files: safetensors with the quantized layers stored as their format's codes,
each weight's range when it was saved, the modelopt quantizer state and a `fastgen.quant` header;
read back with every number the quantizers will trust checked first."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from ..files import atomic_path, read_metadata
from .compact import compress_weight, int4_values
from .formats import get_format
from .quantizers import LayerQuantizers

QUANT_KEY = "fastgen.quant"  # safetensors metadata of a saved quantized model
STATE_PREFIX = "fastgen_quant."  # tensors of the modelopt quantizer state in a saved file
RANGE_PREFIX = "fastgen_quant_weight_range."  # each quantized weight's amax when it was saved
FORMAT_VERSION = 1
# The dtypes a saved layer may be restored to: a closed list, never a name looked up on torch.
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def compress_for_file(weight: torch.Tensor, fmt) -> dict[str, torch.Tensor]:
    """A layer's weight as stored in a saved file: modelopt's packed data + float32 scales."""
    w = weight.detach().float().cpu()
    if fmt.codes is None or (fmt.codes == "int4" and w.shape[-1] % 2):  # nvfp4 has no CPU packing here: the file is not smaller
        return {"weight": weight.detach().cpu().contiguous()}
    codes, scale = compress_weight(w, fmt.codes)
    return {"weight": codes, "weight_scale": scale}


def decompress_from_file(stored: dict[str, torch.Tensor], fmt, shape, dtype) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor

    if "weight_scale" not in stored:
        return stored["weight"].to(dtype)
    data, scale = stored["weight"], stored["weight_scale"]
    if fmt.codes == "fp8":
        w = FP8QTensor(torch.Size(shape), torch.float32, data).dequantize(torch.float32, scale=scale)
    elif fmt.codes == "int8":
        w = INT8QTensor(torch.Size(shape), torch.float32, data).dequantize(torch.float32, scale=scale)
    else:
        w = int4_values(data, scale, shape)
    return w.reshape(shape).to(dtype)


def save_quantized(path: str, state_dict: dict[str, torch.Tensor], bank: LayerQuantizers, prefix: str = "",
                   metadata: dict[str, str] | None = None):
    """Write a model's weights with the quantized layers stored compressed, the modelopt quantizer
    state and `fastgen.quant` metadata, atomically. `prefix` is the layers' key prefix in the
    state dict (e.g. "diffusion_model." for host models)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    info = {**bank.describe_state(), "version": FORMAT_VERSION, "weights": {}}
    for name in bank.layers:
        key = f"{prefix}{name}.weight"
        if key not in tensors:
            raise ValueError(f"the state dict has no {key}: it does not belong to the quantized model")
        weight = tensors.pop(key)
        info["weights"][name] = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}
        quantized, weight_range = bank.quantized_weight(name, weight)
        for suffix, value in compress_for_file(quantized, bank.format).items():
            tensors[f"{prefix}{name}.{suffix}"] = value
        if weight_range is not None:
            tensors[f"{RANGE_PREFIX}{name}"] = weight_range.float().cpu().contiguous()
    for key, value in bank.state_tensors().items():
        tensors[STATE_PREFIX + key] = value
    meta = dict(metadata or {})
    meta[QUANT_KEY] = json.dumps({**info, "prefix": prefix}, sort_keys=True)
    meta["modelopt_state"] = bank.modelopt_state_json()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_quant_info(metadata: dict) -> dict | None:
    if QUANT_KEY not in metadata:
        return None
    try:
        info = json.loads(metadata[QUANT_KEY])
        get_format(info["format"])
        info["layers"], info["weights"]  # noqa: B018 - presence check
        if not isinstance(info["weights"], dict):
            raise TypeError("'weights' is not a mapping")
        for name, spec in info["weights"].items():
            shape = spec["shape"]
            if (not isinstance(shape, list) or not 1 <= len(shape) <= 8
                    or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
                raise ValueError(f"layer {name!r}: shape {shape!r} is not a list of positive sizes")
            if spec["dtype"] not in WEIGHT_DTYPES:
                raise ValueError(f"layer {name!r}: dtype {spec['dtype']!r} is not one of {sorted(WEIGHT_DTYPES)}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"malformed '{QUANT_KEY}' metadata: {err}") from None
    return info


def load_quantized(path: str) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor], dict]:
    """(weights with the quantized layers restored to their dtype, quant info, quantizer state,
    all metadata) from a file `save_quantized` wrote."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        info = read_quant_info(metadata)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if info is None:
        raise ValueError(f"{path} is not a FastGen quantized model (no '{QUANT_KEY}' metadata)")
    tensors = load_file(path)
    fmt, prefix = get_format(info["format"]), info.get("prefix", "")
    state = {k[len(STATE_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(STATE_PREFIX)}
    info["weight_ranges"] = {k[len(RANGE_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(RANGE_PREFIX)}
    for name, spec in info["weights"].items():
        stored = {s: tensors.pop(f"{prefix}{name}.{s}") for s in ("weight", "weight_scale") if f"{prefix}{name}.{s}" in tensors}
        if "weight" not in stored:
            raise ValueError(f"{path}: the quantized weight of {name} is missing")
        # the header's shape against what the file holds, before anything that size is made
        packed = 2 if fmt.weight_bits == 4 and "weight_scale" in stored and stored["weight"].dtype == torch.uint8 else 1
        if math.prod(spec["shape"]) != packed * stored["weight"].numel():  # int4: two values a byte
            raise ValueError(f"{path}: {name}'s header shape {spec['shape']} does not fit its stored "
                             f"{list(stored['weight'].shape)} {fmt.name} weight (a damaged or edited file)")
        try:
            weight = decompress_from_file(stored, fmt, spec["shape"], torch.float32)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: the quantized weight of {name} does not unpack to {spec['shape']}: "
                             f"{str(err).splitlines()[0]}") from None
        pre_quant_scale = state.get(f"{name}.weight_quantizer._pre_quant_scale")
        if pre_quant_scale is not None:  # stored in the scaled space (see LayerQuantizers.quantized_weight)
            weight = weight / pre_quant_scale.float()
        tensors[f"{prefix}{name}.weight"] = weight.to(WEIGHT_DTYPES[spec["dtype"]])
    _check_scales(path, info, state, info["weight_ranges"])
    return tensors, info, state, metadata


def _check_scales(path: str, info: dict, state: dict[str, torch.Tensor], ranges: dict[str, torch.Tensor]):
    """The saved ranges and scales a quantizer will divide by: finite numbers, at most one per
    weight of a layer the header names (a NaN range would make every image NaN, silently)."""
    layers = info["weights"]
    for key, value in [*state.items(), *ranges.items()]:
        layer = key.rsplit(".", 2)[0] if key in state else key
        if layer not in layers:
            raise ValueError(f"{path}: quantizer state {key!r} belongs to no quantized layer of the header")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ValueError(f"{path}: the saved range / scale {key!r} of {layer} is not all finite numbers (a damaged file)")
        if value.numel() > math.prod(layers[layer]["shape"]):
            raise ValueError(f"{path}: the saved range / scale {key!r} has {value.numel()} values, more than {layer}'s weights")


def restore_quantizers(model: nn.Module, info: dict, state: dict[str, torch.Tensor]) -> LayerQuantizers:
    """The quantizers of a loaded file, without calibration."""
    missing = [n for n in info["layers"] if n not in dict(model.named_modules())]
    if missing:
        raise ValueError(f"the saved quantization names layers this model does not have (e.g. {missing[0]})")
    bank = LayerQuantizers(model, info["format"], info["layers"])
    bank.load_state_tensors(state)
    bank.snap_loaded_weights(model, info.get("weight_ranges", {}))
    return bank
