"""modelopt's view of the host's layers: the host's Linear classes registered with modelopt, each
format's modelopt config, the shallow clones ("shadows") that modelopt converts in place of the
host's layers, and what a converted layer's quantizers hold."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from .compact import dequantized
from .formats import import_mtq


def register_linear_classes(classes) -> list[type]:
    """Register Linear subclasses (the host's comfy.ops ones) with modelopt, once each, so that
    `mtq.quantize` converts them; modelopt skips unregistered subclasses silently."""
    mtq = import_mtq()
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear

    added = []
    for cls in classes:
        if cls is nn.Linear or not issubclass(cls, nn.Linear) or cls in QuantModuleRegistry:
            continue
        mtq.register(original_cls=cls, quantized_cls=_QuantLinear)
        added.append(cls)
    return added


def modelopt_config(fmt) -> dict:
    """The format's modelopt preset with only its weight / input quantizer entries: the preset's
    name-based exclusions are LLM names, and the layer selection here is explicit."""
    mtq = import_mtq()
    preset = copy.deepcopy(getattr(mtq, fmt.preset))
    keep = {"*", "*weight_quantizer", "*input_quantizer"}
    entries = [e for e in preset["quant_cfg"] if e.get("quantizer_name") in keep and not e.get("parent_class")]
    return {"quant_cfg": entries, "algorithm": preset.get("algorithm", "max")}


def shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing the parameter tensors (no copy): modelopt
    converts the clone, the host's module stays as it is."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if hasattr(module, hooks):
            setattr(clone, hooks, type(getattr(module, hooks))())
    # host (comfy.ops) layers: the plain F.linear route; the host's weight casting and patches
    # are applied by whoever hands the weight in (see LayerQuantizers.linear)
    for attr, value in (("comfy_cast_weights", False), ("weight_function", []), ("bias_function", [])):
        if hasattr(module, attr):
            setattr(clone, attr, value)
    # a compact layer (codes + scale, its own plain forward): the clone is an ordinary layer, with
    # values to calibrate on while it is converted (LayerQuantizers then drops them)
    for attr in ("forward", "compact_format", "convert_weight", "set_weight"):
        clone.__dict__.pop(attr, None)
    if getattr(module, "compact_format", None):
        clone._parameters["weight"] = nn.Parameter(dequantized(module, module.weight.detach(), torch.float32), requires_grad=False)
        clone._parameters.pop("weight_scale", None)
    return clone


def put_module(root: nn.Module, name: str, module: nn.Module):
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


@contextlib.contextmanager
def no_weight_folding():
    """SmoothQuant / AWQ fold their scales into the weight in place by default; the weights are
    the host's, so keep the scale on the weight quantizer instead (modelopt's own switch)."""
    from modelopt.torch.quantization import model_calib

    before = model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS
    model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = False
    try:
        yield
    finally:
        model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = before


def quantizers_of(shadow: nn.Module):
    return [(kind, getattr(shadow, kind)) for kind in ("input_quantizer", "weight_quantizer") if hasattr(shadow, kind)]


def quantizer_device(shadow, default):
    """Where a layer's quantizer state lives (its buffers), else `default`."""
    for _, quantizer in quantizers_of(shadow):
        for buffer in quantizer.buffers():
            return buffer.device
    return default


def pre_quant_scale(quantizer):
    """SmoothQuant's / AWQ's per-channel scale of a quantizer, or None."""
    return quantizer.pre_quant_scale if getattr(quantizer, "_enable_pre_quant_scale", False) else None


def static_amax(quantizer):
    return getattr(quantizer, "_amax", None) if quantizer.is_enabled else None
