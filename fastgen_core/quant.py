"""Quantization on nvidia-modelopt: formats, layer selection, calibration, real low-precision GEMMs.

Design: quantizers live *beside* the model, never inside it
-----------------------------------------------------------
The host patches weights on its ModelPatcher: a LoRA is a list of patches that the patcher bakes
into a layer's weight when it loads the model (or applies per call in low-VRAM mode, through the
layer's `weight_function`). The loaded model object is shared by every clone of the MODEL, so a
node must never convert it in place, and weights that a LoRA will patch must stay in a precision
the patcher can add a delta to.

So `LayerQuantizers` quantizes a *shadow* of the selected layers: a shallow clone of each host
Linear (same class, same weight tensors, no copy) put in a small module tree and converted by
`mtq.quantize`. modelopt owns everything quantization: the quantizer configs of each format,
calibration (max, SmoothQuant, AWQ-lite), the quantizer state (`amax`, pre-quant scales) and the
real quantized tensors (`FP8QTensor` / `INT8QTensor` / `INT4QTensor.quantize`, what `mtq.compress`
calls). The host's own Linear subclasses must therefore be registered with modelopt
(`register_linear_classes`, which the node layer calls with the classes it finds in the model).

At run time a wrapper around the diffusion model (see `installed`) routes each selected layer
through its shadow for the duration of one forward: the host's *current* weight — with every LoRA
patch already applied, whatever the order of the LoRA and quantize nodes in the graph — is handed
to the shadow, whose modelopt quantizers quantize it and the activations. Weight scales are
dynamic (recomputed from the weight it is given, so a LoRA's delta is never clipped to the base
weight's range); activation scales are dynamic per call unless a calibration run fixed them.

Three execution paths, chosen per device and format (`choose_path`):
- "fp8 GEMM": fp8 e4m3 weights (quantized once per weight version and cached) and per-call fp8
  activations through `torch._scaled_mm` (NVIDIA SM >= 8.9: Ada, Hopper, Blackwell);
- "int8 GEMM": int8 weights (per output channel) and activations through `torch._int_mm`
  (NVIDIA SM >= 8.0);
- "fake-quant": modelopt's quantize-dequantize in the original precision: the accuracy of the
  format, no speedup (CPU, older GPUs, int4 weight-only, nvfp4 until its GEMM is wired).
On a model the host owns, the originals stay resident so that LoRAs can keep patching them at full
range, and the cached low-precision copies add memory. The saving comes from `save_quantized` (on
disk) and `compact_layers` (in memory, for a model loaded from such a file: fp8 / int8 codes with
the host's hooks for low-precision weights, through which LoRAs are added at the saved scales).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import math
import os
import re
import types
from dataclasses import dataclass

import torch
from torch import nn

QUANT_KEY = "fastgen.quant"  # safetensors metadata of a saved quantized model
STATE_PREFIX = "fastgen_quant."  # tensors of the modelopt quantizer state in a saved file
RANGE_PREFIX = "fastgen_quant_weight_range."  # each quantized weight's amax when it was saved
FORMAT_VERSION = 1
MODELOPT_HELP = "pip install nvidia-modelopt (needs torch >= 2.8 and requests)"
log = logging.getLogger("fastgen")


@dataclass(frozen=True)
class QuantFormat:
    name: str
    preset: str  # the modelopt config this format starts from
    weight_bits: int
    gemm: str | None  # "fp8" / "int8": a real low-precision GEMM exists for it
    needs_calibration: bool = False  # SmoothQuant and AWQ search scales on real activations
    min_capability: tuple[int, int] | None = None  # hardware needed even to run it
    description: str = ""


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("fp8", "FP8_DEFAULT_CFG", 8, "fp8", description="fp8 e4m3 weights and activations, per-tensor scales"),
        QuantFormat("int8", "INT8_DEFAULT_CFG", 8, "int8", description="int8 weights per output channel, int8 activations per tensor"),
        QuantFormat("int8_smoothquant", "INT8_SMOOTHQUANT_CFG", 8, "int8", needs_calibration=True,
                    description="int8 with SmoothQuant's per-channel activation smoothing (needs calibration)"),
        QuantFormat("int4", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 4, None,
                    description="int4 weight-only, blocks of 128 (memory, no int4 GEMM in torch)"),
        QuantFormat("int4_awq", "INT4_AWQ_CFG", 4, None, needs_calibration=True,
                    description="int4 weight-only with AWQ-lite scale search (needs calibration)"),
        QuantFormat("nvfp4", "NVFP4_DEFAULT_CFG", 4, None, min_capability=(10, 0),
                    description="NVFP4 (4-bit float, blocks of 16): NVIDIA Blackwell only"),
    )
}

# Layers quantized by default, per architecture (class names of the diffusion model, any in its
# MRO). Everything else stays in high precision: embeddings, timestep / modulation MLPs,
# Linear(1, d), the final projection and norms. The host's Flux, Wan and UNet names are theirs.
DEFAULT_LAYERS = {
    "DigitDiT": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "CausalWorldDiT": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "WanModel": ["blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
                 "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
                 "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img", "blocks.*.ffn.0", "blocks.*.ffn.2"],
    "Flux": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
             "double_blocks.*.txt_attn.proj", "double_blocks.*.img_mlp.0", "double_blocks.*.img_mlp.2",
             "double_blocks.*.txt_mlp.0", "double_blocks.*.txt_mlp.2", "single_blocks.*.linear1", "single_blocks.*.linear2"],
    "UNetModel": ["*transformer_blocks.*.attn1.to_*", "*transformer_blocks.*.attn2.to_*",
                  "*transformer_blocks.*.ff.net.0.proj", "*transformer_blocks.*.ff.net.2"],
}
# Fallback for other architectures: Linear layers inside numbered blocks, minus these words.
KEEP_WORDS = ("embed", "time", "modulation", "adaln", "ada", "norm", "final", "head", "proj_out", "mod.lin", "_in.")


def import_mtq():
    """modelopt's quantization package (slow to import: ~5 s, so only when a quantizer is built)."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise RuntimeError(f"Quantization needs nvidia-modelopt, which is not installed or failed to import ({err}): "
                           f"{MODELOPT_HELP}") from None
    return mtq


def get_format(name: str) -> QuantFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown quantization format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def check_format_runs(fmt: QuantFormat, device: torch.device):
    """Refuse formats this device cannot run, naming what they need."""
    if fmt.min_capability is None:
        return
    need = f"an NVIDIA Blackwell GPU (compute capability {fmt.min_capability[0]}.{fmt.min_capability[1]} or newer: B200, GB200, RTX 50xx)"
    if device.type != "cuda":
        raise ValueError(f"{fmt.name} needs {need}; this model runs on {device.type.upper()}. Use fp8 or int8 instead.")
    capability = torch.cuda.get_device_capability(device)
    if capability < fmt.min_capability:
        raise ValueError(f"{fmt.name} needs {need}; this GPU ({torch.cuda.get_device_name(device)}) is compute capability "
                         f"{capability[0]}.{capability[1]}. Use fp8 (SM >= 8.9) or int8 instead.")


def choose_path(fmt: QuantFormat, device: torch.device) -> tuple[str, str]:
    """(path, why): "fp8" / "int8" for a real GEMM on this device, else "fake" with the reason."""
    if device.type != "cuda":
        return "fake", f"fake-quant: accuracy preview only, no speedup on {device.type.upper()}"
    capability = torch.cuda.get_device_capability(device)
    if fmt.gemm == "fp8":
        if capability >= (8, 9):
            return "fp8", "fp8 GEMM (torch._scaled_mm)"
        return "fake", f"fake-quant: fp8 GEMMs need SM >= 8.9, this GPU is SM {capability[0]}.{capability[1]}; no speedup"
    if fmt.gemm == "int8":
        if capability >= (8, 0):
            return "int8", "int8 GEMM (torch._int_mm)"
        return "fake", f"fake-quant: int8 GEMMs need SM >= 8.0, this GPU is SM {capability[0]}.{capability[1]}; no speedup"
    return "fake", f"fake-quant: {fmt.name} has no GEMM here (weight-only / not wired): accuracy preview, no speedup"


# ----------------------------------------------------------------------------- layer selection


def architecture_names(model: nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(model).__mro__]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def parse_pattern(pattern: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", pattern.strip()) if p]


def default_layer(name: str, module: nn.Linear) -> bool:
    """The fallback rule: a Linear inside numbered blocks whose name has none of KEEP_WORDS."""
    lowered = f".{name.lower()}."
    return module.in_features > 1 and bool(re.search(r"\.\d+\.", lowered)) and not any(w in lowered for w in KEEP_WORDS)


def select_layers(model: nn.Module, pattern: str = "") -> list[str]:
    """Names of the Linear layers to quantize: the architecture's defaults, or those matching
    `pattern` (comma- or space-separated globs, e.g. "blocks.*.ffn.*"). Every glob must match."""
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize")
    globs = parse_pattern(pattern)
    if not globs:
        arch = next((n for n in architecture_names(model) if n in DEFAULT_LAYERS), None)
        globs = DEFAULT_LAYERS.get(arch)
        if globs is None:
            chosen = [n for n, m in layers.items() if default_layer(n, m)]
            if not chosen:
                raise ValueError(f"no default layers for {type(model).__name__}: give a layer pattern (e.g. {next(iter(layers))})")
            return chosen
        return [n for n, m in layers.items() if m.in_features > 1 and any(fnmatch.fnmatchcase(n, g) for g in globs)]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
            examples = ", ".join(list(layers)[:6])
            raise ValueError(f"layer pattern {glob!r} matches no Linear layer of this {type(model).__name__} "
                             f"(its {len(layers)} Linear layers are named like {examples})")
    return [n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in globs)]


# ----------------------------------------------------------------------------- modelopt plumbing


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


def modelopt_config(fmt: QuantFormat) -> dict:
    """The format's modelopt preset with only its weight / input quantizer entries: the preset's
    name-based exclusions are LLM names, and the layer selection here is explicit."""
    mtq = import_mtq()
    preset = copy.deepcopy(getattr(mtq, fmt.preset))
    keep = {"*", "*weight_quantizer", "*input_quantizer"}
    entries = [e for e in preset["quant_cfg"] if e.get("quantizer_name") in keep and not e.get("parent_class")]
    return {"quant_cfg": entries, "algorithm": preset.get("algorithm", "max")}


def _shallow_clone(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing the parameter tensors (no copy): modelopt
    converts the clone, the host's module stays as it is."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        if hasattr(module, hooks):
            setattr(clone, hooks, type(getattr(module, hooks))())
    # host (comfy.ops) layers: the plain F.linear path; the host's weight casting and patches
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


def _put(root: nn.Module, name: str, module: nn.Module):
    *parents, leaf = name.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


@contextlib.contextmanager
def _no_weight_folding():
    """SmoothQuant / AWQ fold their scales into the weight in place by default; the weights are
    the host's, so keep the scale on the weight quantizer instead (modelopt's own switch)."""
    from modelopt.torch.quantization import model_calib

    before = model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS
    model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = False
    try:
        yield
    finally:
        model_calib._ENABLE_FOLDING_PQS_TO_WEIGHTS = before


def _quantizers(shadow: nn.Module):
    return [(kind, getattr(shadow, kind)) for kind in ("input_quantizer", "weight_quantizer") if hasattr(shadow, kind)]


# ----------------------------------------------------------------------------- the quantizer bank


class LayerQuantizers:
    """modelopt quantizers for the selected Linear layers of `model`, held beside it.

    `linear(name, x, weight, bias)` computes one quantized layer with the weight it is given;
    `installed(model)` routes the layers of a model through it for a block of code.
    """

    def __init__(self, model: nn.Module, fmt: str, layers: list[str]):
        self.format = get_format(fmt)
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("no layers selected for quantization")
        mtq = import_mtq()
        modules = {name: model.get_submodule(name) for name in self.layers}
        register_linear_classes({type(m) for m in modules.values()})
        self.root = nn.Module()
        for name, module in modules.items():
            _put(self.root, name, _shallow_clone(module))
        self._base = {name: {k: v for k, v in module._parameters.items() if k in ("weight", "bias")} for name, module in modules.items()}
        self.config = modelopt_config(self.format)
        with _no_weight_folding():
            # conversion only: no weight is read (the weight scales are dynamic), so host weights in
            # any storage dtype (the host's fp8 checkpoints) are fine
            mtq.quantize(self.root, {**self.config, "algorithm": None}, forward_loop=None)
        self.shadows = {name: self.root.get_submodule(name) for name in self.layers}
        unconverted = [n for n, s in self.shadows.items() if not hasattr(s, "weight_quantizer")]
        if unconverted:
            raise RuntimeError(f"modelopt did not convert {len(unconverted)} layers (e.g. {unconverted[0]}: "
                               f"{type(modules[unconverted[0]]).__name__}); is its class registered?")
        self._make_weights_dynamic()
        self._restore_base_weights()
        self.calibrated = False
        self.path = "fake"
        self.fallback = None  # why a real GEMM path fell back to fake-quant, if it did
        self._cache: dict[str, tuple] = {}
        self.compiled_layers = 0  # layers on the compiled GEMM path at the last `installed` (see there)

    def to(self, device) -> LayerQuantizers:
        """Move the quantizers' state (amax, pre-quant scales) to `device`. Only the quantizers:
        the shadows' weight tensors are the model's own and stay where the host keeps them."""
        for shadow in self.shadows.values():
            for _, quantizer in _quantizers(shadow):
                quantizer.to(device)
        self._cache.clear()
        return self

    # -- state

    def quantized_count(self) -> int:
        """Layers whose weight quantizer is on (what a test counts)."""
        return sum(1 for s in self.shadows.values() if s.weight_quantizer.is_enabled)

    def _make_weights_dynamic(self):
        """Drop the static weight amax: each weight is scaled by its own current range, so a LoRA
        applied after quantization is not clipped to the base weight's range."""
        for shadow in self.shadows.values():
            quantizer = shadow.weight_quantizer
            if hasattr(quantizer, "_amax") and not (quantizer.block_sizes and quantizer.block_sizes.get("type") == "dynamic"):
                del quantizer._amax

    def calibrate(self, forward_loop):
        """Run modelopt's calibration for this format (max, SmoothQuant or AWQ-lite) while
        `forward_loop()` runs the model with these quantizers installed."""
        mtq = import_mtq()
        algorithm = self.config["algorithm"]
        with _no_weight_folding(), self._fake_path():
            mtq.calibrate(self.root, algorithm=algorithm, forward_loop=lambda _root: forward_loop())
        self._restore_base_weights()
        self._make_weights_dynamic()
        self.calibrated = True
        self._cache.clear()

    @contextlib.contextmanager
    def _fake_path(self):
        path, self.path = self.path, "fake"
        try:
            yield
        finally:
            self.path = path

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer state modelopt keeps in buffers (amax, pre-quant scales), by name."""
        out = {}
        for name, shadow in self.shadows.items():
            for kind, quantizer in _quantizers(shadow):
                for buffer, value in quantizer.named_buffers(recurse=False):
                    out[f"{name}.{kind}.{buffer}"] = value.detach().cpu().float().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]):
        known = {f"{n}.{k}": q for n, s in self.shadows.items() for k, q in _quantizers(s)}
        for key, value in tensors.items():
            owner, buffer = key.rsplit(".", 1)
            if owner not in known:
                raise ValueError(f"saved quantizer state {key!r} has no layer in this model")
            quantizer = known[owner]
            if buffer == "_amax":
                quantizer.amax = value
            elif buffer == "_pre_quant_scale":
                quantizer._enable_pre_quant_scale = True
                quantizer.pre_quant_scale = value
            else:
                quantizer.register_buffer(buffer, value.clone())
        self.calibrated = any(k.endswith("input_quantizer._amax") for k in tensors)
        self._cache.clear()

    def describe_state(self) -> dict:
        return {"format": self.format.name, "layers": self.layers, "calibrated": self.calibrated,
                "algorithm": self.config["algorithm"] if self.calibrated else "dynamic", "version": FORMAT_VERSION}

    def modelopt_state_json(self) -> str:
        """modelopt's own record of the conversion (config per quantizer), kept for inspection."""
        import modelopt.torch.opt as mto

        return json.dumps(mto.modelopt_state(self.root), default=str)

    @torch.no_grad()
    def quantized_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(modelopt's fake-quantized weight of a layer, the weight range it used). The weight is
        in the space of its pre-quant scale if SmoothQuant / AWQ gave it one."""
        from modelopt.torch.quantization.model_calib import max_calibrate

        shadow = self.shadows[name]
        quantizer = shadow.weight_quantizer
        weight = weight.to(_quantizer_device(shadow, weight.device))
        if quantizer._dynamic:  # nvfp4: blocks scaled on the fly, no range to record
            return quantizer(weight), None
        kept = quantizer._amax.clone() if hasattr(quantizer, "_amax") else None  # a compact layer's static range
        max_calibrate(quantizer, lambda q: q(weight), distributed_sync=False)
        try:
            return quantizer(weight), quantizer.amax.detach().clone()
        finally:
            del quantizer._amax
            if kept is not None:
                quantizer.amax = kept

    @torch.no_grad()
    def snap_loaded_weights(self, model: nn.Module, ranges: dict[str, torch.Tensor]):
        """Re-quantize weights decompressed from a file with the ranges they were saved with, so
        they are bit-identical to the saved model's quantized weights (decompression can be one
        float ulp off, which moves fp8 / int8 rounding of the activations downstream)."""
        for name, amax in ranges.items():
            module, quantizer = model.get_submodule(name), self.shadows[name].weight_quantizer
            device = _quantizer_device(self.shadows[name], module.weight.device)
            quantizer.amax = amax.to(device)
            try:
                snapped = quantizer(module.weight.detach().to(device))
            finally:
                del quantizer._amax
            pre_quant_scale = _weight_pre_quant_scale(self.shadows[name])
            if pre_quant_scale is not None:
                snapped = snapped / pre_quant_scale.to(snapped)
            module.weight.copy_(snapped.to(module.weight.dtype))

    def forget_base_weights(self, name: str, module: nn.Module):
        """Point the shadow at the module's current parameters (after the module replaced them), so
        the bank holds no reference to the old ones."""
        self._base[name] = {k: v for k, v in module._parameters.items() if k in ("weight", "bias")}
        self._restore_layer(name, self.shadows[name])

    def _restore_base_weights(self):
        for name, shadow in self.shadows.items():
            for key, value in self._base[name].items():
                shadow._parameters[key] = value

    # -- compute

    def linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               weight_key=None) -> torch.Tensor:
        """One selected layer on input x with the host's current weight and bias.

        `weight_key` identifies this weight's version (None: not cacheable, e.g. low-VRAM patches
        computed per call): the real paths quantize a weight once per version. A layer stored
        compact (see `compact_layer`) runs on its codes through `compact_linear` instead."""
        shadow = self.shadows[name]
        if self.path in ("fp8", "int8") and _gemm_shapes_ok(weight):
            try:
                return self._real_linear(name, shadow, x, weight, bias, weight_key)
            except RuntimeError as err:  # a torch / driver without this kernel: keep the run going
                self._give_up_real_path(name, err)
        shadow._parameters["weight"] = weight
        shadow._parameters["bias"] = bias
        try:
            return shadow(x)
        finally:
            if not shadow.input_quantizer._if_calib:  # keep the last weight for SmoothQuant / AWQ postprocessing
                self._restore_layer(name, shadow)

    def compact_linear(self, name: str, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor | None:
        """A compact layer straight on its stored codes, or None where the real GEMM cannot take
        it (then the caller dequantizes the weight and goes through `linear`)."""
        if self.path not in ("fp8", "int8") or codes.dtype != _CODE_DTYPES[self.path] or codes.device != x.device \
                or not _gemm_shapes_ok(codes):
            return None
        try:
            return self._gemm(self.shadows[name], x, codes, scale, bias)
        except RuntimeError as err:
            self._give_up_real_path(name, err)
            return None

    def _give_up_real_path(self, name, err):
        log.warning("FastGen quantize: the %s GEMM failed on %s (%s); running fake-quant from now on",
                    self.path, name, str(err).splitlines()[0][:200])
        self.path, self.fallback = "fake", str(err).splitlines()[0][:200]

    def _restore_layer(self, name, shadow):
        for key, value in self._base[name].items():
            shadow._parameters[key] = value

    def _real_linear(self, name, shadow, x, weight, bias, weight_key):
        _, w_q, w_scale, *_ = self._compressed(name, shadow, weight, weight_key, x)
        return self._gemm(shadow, x, w_q, w_scale, bias)

    def _compressed(self, name, shadow, weight, weight_key, x):
        """The cache entry of a layer's compressed weight, (key, codes, scale, x dtype, x device):
        made once per weight version (`weight_key`; None: not cached) and path."""
        cached = self._cache.get(name)
        if cached is None or weight_key is None or cached[0] != weight_key or cached[1].dtype != _CODE_DTYPES[self.path]:
            smoothing = _weight_pre_quant_scale(shadow)
            w = weight if smoothing is None else weight * smoothing.to(weight)
            cached = (weight_key, *compress_weight(w, self.path), x.dtype, x.device)
            if weight_key is not None:
                self._cache[name] = cached
        return cached

    def _graph_inputs(self, name, module, weights) -> tuple[dict[str, torch.Tensor], torch.dtype] | None:
        """The tensors through which a compiled forward runs one layer's real GEMM (`_layer_forward`),
        and the input dtype they are for; None where the layer stays on the eager path (fake-quant,
        a compact layer, a weight without a cache key such as low-VRAM patches or on another device
        than its inputs, widths the GEMM cannot take). The compressed weight is made here if the cache has none for the layer's
        current weight: for the dtype and device of the last input, or at first the weight's own."""
        if self.path not in ("fp8", "int8") or getattr(module, "compact_format", None) or module.weight.ndim != 2:
            return None
        cached = self._cache.get(name)
        dtype, device = (cached[3], cached[4]) if cached is not None else (module.weight.dtype, module.weight.device)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. an fp8 checkpoint's weight: learn x first
            return None
        probe = torch.empty((0, module.weight.shape[1]), dtype=dtype, device=device)  # no data: the weights' dtype and device
        weight, bias, key = weights(module, probe)
        if key is None or weight.device != probe.device or not _gemm_shapes_ok(weight):
            return None
        shadow = self.shadows[name]
        _, w_q, w_scale, *_ = self._compressed(name, shadow, weight, key, probe)
        tensors = {"w_q": w_q, "w_scale": w_scale, "bias": None if bias is None else bias.detach(),
                   "input_amax": _static_amax(shadow.input_quantizer), "input_scale": _input_pre_quant_scale(shadow)}
        return {f"{_PREFIX}{k}": v for k, v in tensors.items() if v is not None}, dtype

    def _gemm(self, shadow, x, w_q, w_scale, bias):
        x = _input_pre_quant(shadow, x)
        input_amax = _static_amax(shadow.input_quantizer)
        if self.path == "fp8":
            return fp8_linear(x, w_q, w_scale, bias, input_amax)
        return int8_linear(x, w_q, w_scale, bias, input_amax)

    @contextlib.contextmanager
    def installed(self, model: nn.Module, weights=None):
        """Route the selected layers of `model` through these quantizers inside the block.

        `weights(module, x) -> (weight, bias, key)` gives a layer's current weight (default: its
        parameters as they are). The forward is swapped on the module instances only for the
        block, so other users of the same model are unaffected outside it.

        Every layer gets the same forward function (`_layer_forward`), so torch.compile traces one
        graph for all of them. On the real GEMM paths a layer whose weight has a cache key also
        gets its compressed weight (made now if not cached) and the other per-layer tensors as
        non-persistent buffers: a compiled forward runs its GEMM inside the graph, with these
        tensors as graph inputs. They are the weight of entry time: a weight changed inside the
        block reaches eager calls only (the node enters this per model call). Everything else (and
        every eager call) goes through the eager `_QuantForward`. `compiled_layers` counts the
        layers with a compiled path at the last entry."""
        weights = weights or _plain_weights
        installs = []
        self.compiled_layers = 0
        try:
            for name in self.layers:
                module = model.get_submodule(name)
                installs.append(_Install(module))
                module.__dict__[_EAGER] = _QuantForward(self, name, module, weights)
                try:
                    graph = self._graph_inputs(name, module, weights)
                except Exception as err:  # noqa: BLE001 - the eager forward works without it: never fail the run here
                    log.debug("FastGen quantize: no compiled path for %s (%s)", name, err)
                    graph = None
                # bound methods of two shared functions: dynamo guards on the function, not on the layer
                module.forward = types.MethodType(_eager_layer if graph is None else _layer_forward, module)
                if graph is not None:
                    tensors, dtype = graph
                    for key, value in tensors.items():
                        module.register_buffer(key, value, persistent=False)
                    module.__dict__[_DTYPE] = dtype
                    self.compiled_layers += 1
            yield self
        finally:
            for install in reversed(installs):
                install.restore()


_PREFIX = "_fastgen_"  # the per-layer buffers of a compiled forward (installed / _layer_forward)
_EAGER, _DTYPE = "_fastgen_eager", "_fastgen_dtype"
_BUFFERS = tuple(f"{_PREFIX}{k}" for k in ("w_q", "w_scale", "bias", "input_amax", "input_scale"))
_MISSING = object()


class _Install:
    """What `installed` changes on one module, to put back exactly: its instance attributes
    (forward, the eager forward, the input dtype) and the buffers of the compiled path."""

    def __init__(self, module):
        self.module = module
        self.attrs = {a: module.__dict__.get(a, _MISSING) for a in ("forward", _EAGER, _DTYPE)}
        self.buffers = {b: module._buffers.get(b, _MISSING) for b in _BUFFERS}
        self.non_persistent = {b for b in _BUFFERS if b in module._non_persistent_buffers_set}

    def restore(self):
        module = self.module
        for attr, value in self.attrs.items():
            if value is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                module.__dict__[attr] = value
        for buffer, value in self.buffers.items():
            if value is _MISSING:
                module._buffers.pop(buffer, None)
            else:
                module._buffers[buffer] = value
            if buffer in self.non_persistent:
                module._non_persistent_buffers_set.add(buffer)
            else:
                module._non_persistent_buffers_set.discard(buffer)


def _layer_forward(self, x, *args, **kwargs):
    """The forward of an installed layer with a compressed weight (bound to each such module):
    one function for all layers, whose per-layer data are the module's own buffers, so dynamo
    (inlining nn modules) lifts them as graph inputs and every layer shares one graph: no
    per-layer object or name is traced. Compiled, it runs the real GEMM in the graph; eager (or
    for an input of another dtype or device than the weight was compressed for), the layer's
    `_QuantForward`, which checks the weight's version on every call."""
    if not torch.compiler.is_compiling():
        return self.__dict__[_EAGER](x, *args, **kwargs)
    w_q = self._fastgen_w_q
    if x.dtype != self._fastgen_dtype or x.device != w_q.device:
        return _eager_layer(self, x, *args, **kwargs)
    scale = self._buffers.get("_fastgen_input_scale")
    if scale is not None:  # SmoothQuant's per-channel input smoothing
        x = x * scale.to(x)
    linear = int8_linear if w_q.dtype == torch.int8 else fp8_linear
    return linear(x, w_q, self._fastgen_w_scale, self._buffers.get("_fastgen_bias"), self._buffers.get("_fastgen_input_amax"))


# The forward of the other installed layers (fake-quant, compact, uncached weights), opaque to
# torch.compile (a compiled block calls it eagerly, a graph break): the eager path's fake-quant
# round trips must not be folded by inductor, and its cache is Python state. One function for
# every layer (the module is its argument), so no per-layer guard either.
@torch.compiler.disable
def _eager_layer(module, x, *args, **kwargs):
    return module.__dict__[_EAGER](x, *args, **kwargs)


class _QuantForward:
    """One layer's eager quantized forward (any path: fake-quant, compact codes, the real GEMMs
    with the weight quantized once per version)."""

    def __init__(self, bank, name, module, weights):
        self.bank, self.name, self.module, self.weights = bank, name, module, weights

    @torch.compiler.disable
    def __call__(self, x, *args, **kwargs):
        compressed = compact_codes(self.module, self.bank.path)
        if compressed is not None:  # codes as stored: no per-call dequantized copy of the weight
            bias = self.module.bias
            out = self.bank.compact_linear(self.name, x, *compressed, None if bias is None else bias.to(x.dtype))
            if out is not None:
                return out
        weight, bias, key = self.weights(self.module, x)
        return self.bank.linear(self.name, x, weight, bias, key)


def _plain_weights(module: nn.Module, x: torch.Tensor):
    weight = dequantized(module, module.weight, x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return weight, bias, (id(module.weight), module.weight._version)


def quantize_model(model: nn.Module, fmt: str = "fp8", pattern: str = "", forward_loop=None) -> LayerQuantizers:
    """Quantizers for `model` (its default layers, or `pattern`), calibrated when given a
    `forward_loop()` that runs the model under `bank.installed(model)`."""
    fmt_spec = get_format(fmt)
    check_format_runs(fmt_spec, _device_of(model))
    bank = LayerQuantizers(model, fmt, select_layers(model, pattern))
    if forward_loop is not None:
        bank.calibrate(forward_loop)
    elif fmt_spec.needs_calibration:
        raise ValueError(f"{fmt} needs a calibration run (it searches scales on real activations): give calibration inputs")
    return bank


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- real kernels


def _gemm_shapes_ok(weight) -> bool:
    """cuBLAS low-precision GEMMs want dimensions in multiples of 16 (int8 also more than 16
    rows: `int8_linear` pads fewer)."""
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0


def _quantizer_device(shadow, default):
    """Where a layer's quantizer state lives (its buffers), else `default`."""
    for _, quantizer in _quantizers(shadow):
        for buffer in quantizer.buffers():
            return buffer.device
    return default


def _weight_pre_quant_scale(shadow):
    quantizer = shadow.weight_quantizer
    return quantizer.pre_quant_scale if getattr(quantizer, "_enable_pre_quant_scale", False) else None


def _input_pre_quant_scale(shadow):
    """SmoothQuant's per-channel input smoothing of a layer, or None."""
    quantizer = shadow.input_quantizer
    return quantizer.pre_quant_scale if getattr(quantizer, "_enable_pre_quant_scale", False) else None


def _input_pre_quant(shadow, x):
    scale = _input_pre_quant_scale(shadow)
    return x if scale is None else x * scale.to(x)


def _static_amax(quantizer):
    return getattr(quantizer, "_amax", None) if quantizer.is_enabled else None


def compress_weight(weight: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, float32 scale) by modelopt's QTensors: fp8 per tensor, int8 per output channel."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor

    if path == "fp8":
        qtensor, scale = FP8QTensor.quantize(weight, axis=None)
    elif path == "int8":
        qtensor, scale = INT8QTensor.quantize(weight, axis=0)
    else:
        raise ValueError(f"no compressed weight for path {path!r}")
    return qtensor._quantized_data.contiguous(), scale.float().reshape(-1)


def _activation_codes(x2: torch.Tensor, amax, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-tensor float32 scale) of an activation by modelopt's QTensors: dynamic range
    (`reduce_amax`) unless a calibration fixed it, then saturated to it as the fake path does.

    Pure tensor code with no host sync, so `_fused` can compile it into two passes over x (one
    reduction, one cast); eager, modelopt's reduce / divide / cast take about five, which on a
    Hopper cost as much as the fp8 GEMM saves."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor
    from modelopt.torch.quantization.utils import reduce_amax

    qmax = 448.0 if fmt == "fp8" else 127.0
    if amax is None:  # per row, then over rows: a parallel reduction (compiled with dynamic shapes, one
        # reduction to a scalar ran on few blocks: 72 us for a 4608 x 3072 tensor on an H200)
        scale = (reduce_amax(x2, axis=-1).max().float() / qmax).clamp_min(1e-12)
    else:  # per tensor, also from a per-channel calibrated range
        limit = amax.to(x2.device).float().max()
        scale = (limit / qmax).clamp_min(1e-12)
        x2 = torch.minimum(torch.maximum(x2, -limit.to(x2.dtype)), limit.to(x2.dtype))
    qtensor = FP8QTensor if fmt == "fp8" else INT8QTensor
    return qtensor.quantize(x2, scales=scale)[0]._quantized_data, scale


def _int8_epilogue(acc: torch.Tensor, x_scale, w_scale, bias, dtype) -> torch.Tensor:
    """int32 GEMM accumulators -> dtype: per-tensor activation scale x per-channel weight scale, + bias."""
    out = acc.to(torch.float32) * (x_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


_FUSED: dict = {}


def _fused(fn, x: torch.Tensor):
    """`fn` compiled by torch.compile on CUDA (its elementwise passes fused by inductor), eager
    elsewhere, eager for good if compiling fails here (no Triton, no compiler). Shapes are
    dynamic: one compiled kernel set serves every layer width and token count.
    FASTGEN_QUANT_COMPILE=0 turns it off."""
    if x.device.type != "cuda" or torch.compiler.is_compiling() or os.environ.get("FASTGEN_QUANT_COMPILE", "1") == "0":
        return fn  # (inside a compiled graph, inductor fuses it with the rest)
    entry = _FUSED.get(fn)
    if entry is None:
        entry = _FUSED[fn] = _FirstCallFallback(fn)
    return entry


class _FirstCallFallback:
    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        # Plain aliases, not views: outside inference mode a reshaped activation is a view, and
        # dynamo guards on its base's sizes (a guard that failed and recompiled per call site)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager function is exact
            log.warning("FastGen quantize: torch.compile of %s failed (%s); running it eagerly",
                        self.fn.__name__, str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            self.compiled = None
            return self.fn(*args)


def fp8_linear(x, w_fp8, w_scale, bias=None, input_amax=None):
    """y = x W^T + b with fp8 e4m3 operands through torch._scaled_mm (per-tensor scales)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_fp8, x_scale = _fused(_activation_codes, x)(x2, input_amax, "fp8")
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.reshape(()),
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], -1)


def int8_linear(x, w_int8, w_scale, bias=None, input_amax=None):
    """y = x W^T + b with int8 operands through torch._int_mm (int32 accumulation), rescaled per
    tensor (activations) and per output channel (weights)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_int8, x_scale = _fused(_activation_codes, x)(x2, input_amax, "int8")
    rows = x_int8.shape[0]
    if rows <= 16:  # cuBLAS's int8 GEMM takes more than 16 rows: zero rows, cut off again
        x_int8 = torch.nn.functional.pad(x_int8, (0, 0, 0, 32 - rows))
    try:
        acc = torch._int_mm(x_int8, w_int8.t())
    except RuntimeError:  # a build that wants the second operand row-major
        acc = torch._int_mm(x_int8, w_int8.t().contiguous())
    acc = acc[:rows]
    out = _fused(_int8_epilogue, x)(acc, x_scale, w_scale.to(acc.device), bias, x.dtype)
    return out.reshape(*shape[:-1], -1)


_CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def compact_layers(model: nn.Module, bank: LayerQuantizers, ranges: dict | None = None) -> list[str]:
    """`compact_layer` for every layer of `bank`, from its fake-quantized weight (so the codes are
    modelopt's own rounding); their weight quantizers keep that range from now on (`ranges`: the
    ones a loaded file's weights were snapped with). Layers with a SmoothQuant / AWQ scale stay as
    they are."""
    done = []
    for name in bank.layers:
        module = model.get_submodule(name)
        if _weight_pre_quant_scale(bank.shadows[name]) is None and compact_kind(bank.format, module.weight) is not None:
            values, weight_range = bank.quantized_weight(name, module.weight.detach())
            compact_layer(module, bank.format, values.to(module.weight.device))
            # the codes' scale is fixed now (the host adds LoRAs with it), so the weight quantizer
            # takes the same fixed range: it then reproduces the saved values bit for bit
            saved = (ranges or {}).get(name)  # a loaded file's: the range its weights were snapped with
            bank.shadows[name].weight_quantizer.amax = weight_range if saved is None else saved.to(weight_range)
            bank.forget_base_weights(name, module)  # so the full-precision weights can be freed
            done.append(name)
    bank._cache.clear()
    return done


INT4_BLOCK = 128  # the int4 formats' block size (modelopt's INT4_BLOCKWISE / AWQ configs)


def compact_kind(fmt: QuantFormat, weight: torch.Tensor) -> str | None:
    """The in-memory code a layer of `fmt` can be held as: "fp8" / "int8" (1 byte a weight, fed
    to the GEMM), "int4" (two weights a byte in blocks of 128, dequantized per call), or None."""
    if fmt.gemm in _CODE_DTYPES:
        return fmt.gemm
    if fmt.name.startswith("int4") and weight.ndim == 2 and weight.shape[-1] % INT4_BLOCK == 0:
        return "int4"
    return None


def compact_layer(module: nn.Linear, fmt: QuantFormat, values: torch.Tensor | None = None) -> bool:
    """Store a layer's weight compressed in memory (fp8 / int8 codes + float32 scale: half of
    bf16; int4: modelopt's packed blockwise codes, a quarter) for a model this code owns (a loaded
    quantized file). The layer gets the host's hooks for low-precision weights, `convert_weight`
    (codes -> values) and `set_weight` (values -> codes with the stored scales), through which the
    host's LoRA patching reaches it; `dequantized` gives the values for a forward. False for
    formats with no compact code (nvfp4)."""
    weight = module.weight.detach() if values is None else values
    kind = compact_kind(fmt, weight)
    if kind is None:
        return False
    if kind == "int4":
        from modelopt.torch.quantization.qtensor import INT4QTensor

        qtensor, scale = INT4QTensor.quantize(weight.float(), block_size=INT4_BLOCK)
        codes, scale = qtensor._quantized_data, scale.float()
    else:
        codes, scale = compress_weight(weight, kind)
        scale = scale.reshape((-1, 1) if kind == "int8" else ())
    module.weight = nn.Parameter(codes, requires_grad=False)
    module.weight_scale = nn.Parameter(scale, requires_grad=False)
    module.compact_format = kind
    module.convert_weight = _convert_weight.__get__(module)
    module.set_weight = _set_weight.__get__(module)
    return True


def dequantized(module: nn.Module, weight: torch.Tensor, dtype) -> torch.Tensor:
    """A layer's weight as the host cast it, as values in `dtype`: a compact layer's holds codes
    (the host may have cast them to a float dtype: the codes are small integers or fp8 values,
    exact in any of them)."""
    kind = getattr(module, "compact_format", None)
    if kind is None:
        return weight.to(dtype)
    if kind == "int4":
        return _int4_values(weight, module.weight_scale).to(dtype)
    return (weight.float() * module.weight_scale.to(weight.device).float()).to(dtype)


def _int4_values(codes: torch.Tensor, scale: torch.Tensor, shape=None) -> torch.Tensor:
    """Packed int4 codes (any dtype holding the byte values) -> float32 values of `shape`, by
    modelopt (default: [N, K] from codes [N, K/2], for widths in whole blocks)."""
    from modelopt.torch.quantization.qtensor import INT4QTensor

    codes = codes if codes.dtype == torch.uint8 else codes.to(torch.uint8)
    shape = torch.Size(shape if shape is not None else (codes.shape[0], codes.shape[1] * 2))
    return INT4QTensor(shape, torch.float32, codes).dequantize(torch.float32, scale=scale.to(codes.device),
                                                              block_sizes={-1: INT4_BLOCK})


def _int4_codes_at(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> packed int4 codes at *fixed* block scales (`scale` = 7 / block amax, as
    modelopt's INT4QTensor stores them), saturating: the layout INT4QTensor.quantize writes, which
    only takes scales of its own choosing. A LoRA added by the host keeps the stored scales, as
    the 8-bit compact layers do."""
    blocks = values.float().reshape(-1, INT4_BLOCK) * scale.to(values.device).reshape(-1, 1)
    codes = (blocks.round().clamp(-8, 7) + 8).to(torch.uint8).flatten()
    return (codes[::2] << 4 | codes[1::2]).reshape(values.shape[0], -1)


def compact_codes(module: nn.Module, path: str):
    """(codes, scale) of a compact layer for the real GEMM of `path`, or None."""
    if getattr(module, "compact_format", None) != path or getattr(module, "weight_function", None):
        return None
    return module.weight, module.weight_scale.reshape(-1)


def _convert_weight(self, weight, inplace=False, **kwargs):
    if self.compact_format == "int4":  # a new tensor: values have twice the packed width
        return _int4_values(weight, self.weight_scale).to(weight.dtype)
    scale = self.weight_scale.to(weight.device, weight.dtype)
    return weight.mul_(scale) if inplace else weight * scale


def _set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor

    scale = self.weight_scale.to(weight.device, torch.float32)
    weight = weight.float()
    if self.compact_format == "int4":
        codes = _int4_codes_at(weight, scale)
    elif self.compact_format == "fp8":  # saturate: a LoRA may leave the stored range
        saturated = torch.minimum(torch.maximum(weight, -448.0 * scale), 448.0 * scale)
        codes = FP8QTensor.quantize(saturated, scales=scale)[0]._quantized_data
    else:
        codes = INT8QTensor.quantize(weight, scales=scale)[0]._quantized_data
    if return_weight:
        return codes
    if inplace_update:
        self.weight.data.copy_(codes)
    else:
        self.weight = nn.Parameter(codes, requires_grad=False)


def layer_memory(model: nn.Module, layers: list[str], bits: int) -> tuple[int, int]:
    """(bytes of the selected weights as they are held — a compact layer's codes and scales —,
    bytes at `bits` per weight)."""
    modules = [model.get_submodule(n) for n in layers]
    now = sum(m.weight.nbytes + (m.weight_scale.nbytes if hasattr(m, "weight_scale") else 0) for m in modules)
    return now, sum(m.weight.numel() * bits // 8 for m in modules)


# ----------------------------------------------------------------------------- saved files


def compress_for_file(weight: torch.Tensor, fmt: QuantFormat) -> dict[str, torch.Tensor]:
    """A layer's weight as stored in a saved file: modelopt's packed data + float32 scales."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT4QTensor, INT8QTensor

    w = weight.detach().float().cpu()
    if fmt.gemm == "fp8":
        q, scale = FP8QTensor.quantize(w, axis=None)
    elif fmt.gemm == "int8":
        q, scale = INT8QTensor.quantize(w, axis=0)
    elif fmt.weight_bits == 4 and fmt.name.startswith("int4") and w.shape[-1] % 2 == 0:
        q, scale = INT4QTensor.quantize(w, block_size=INT4_BLOCK)
    else:  # nvfp4 has no CPU packing here: stored as it is (the file is not smaller)
        return {"weight": weight.detach().cpu().contiguous()}
    return {"weight": q._quantized_data.contiguous(), "weight_scale": scale.float().contiguous()}


def decompress_from_file(stored: dict[str, torch.Tensor], fmt: QuantFormat, shape, dtype) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor

    if "weight_scale" not in stored:
        return stored["weight"].to(dtype)
    data, scale = stored["weight"], stored["weight_scale"]
    if fmt.gemm == "fp8":
        w = FP8QTensor(torch.Size(shape), torch.float32, data).dequantize(torch.float32, scale=scale)
    elif fmt.gemm == "int8":
        w = INT8QTensor(torch.Size(shape), torch.float32, data).dequantize(torch.float32, scale=scale)
    else:
        w = _int4_values(data, scale, shape)
    return w.reshape(shape).to(dtype)


def save_quantized(path: str, state_dict: dict[str, torch.Tensor], bank: LayerQuantizers, prefix: str = "",
                   metadata: dict[str, str] | None = None):
    """Write a model's weights with the quantized layers stored compressed, the modelopt quantizer
    state and `fastgen.quant` metadata, atomically. `prefix` is the layers' key prefix in the
    state dict (e.g. "diffusion_model." for host models)."""
    from safetensors.torch import save_file

    from .checkpoint import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    info = bank.describe_state()
    info["weights"] = {}
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


# The dtypes a saved layer may be restored to: a closed list, never a name looked up on torch.
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

    from .checkpoint import read_metadata

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
