"""The quantizer bank: `LayerQuantizers` holds modelopt quantizers for the selected layers of a
model in shadows of those layers (see `shadows`), calibrates them, reads and writes their state,
and computes one quantized layer by the bank's GEMM route."""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from . import install
from .compact import compress_weight
from .formats import CODE_DTYPES, check_format_runs, get_format, import_mtq
from .kernels import fp8_linear, gemm_shapes_ok, int8_linear
from .layers import select_layers
from .shadows import (
    modelopt_config,
    no_weight_folding,
    pre_quant_scale,
    put_module,
    quantizer_device,
    quantizers_of,
    register_linear_classes,
    shallow_clone,
    static_amax,
)

log = logging.getLogger("fastgen")


class LayerQuantizers:
    """modelopt quantizers for the selected Linear layers of `model`, held beside it.

    `linear(name, x, weight, bias)` computes one quantized layer with the weight it is given;
    `installed(model)` routes the layers of a model through it for a block of code. `route` is
    how they compute: "fp8" / "int8" (a real GEMM, see `formats.choose_route`) or "fake".
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
            put_module(self.root, name, shallow_clone(module))
        self._base = {name: {k: v for k, v in module._parameters.items() if k in ("weight", "bias")} for name, module in modules.items()}
        self.config = modelopt_config(self.format)
        with no_weight_folding():
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
        self.route = "fake"
        self.fallback = None  # why a real GEMM route fell back to fake-quant, if it did
        self._codes: dict[str, tuple] = {}  # per layer: (weight key, codes, scale, x dtype, x device)
        self.compiled_layers = 0  # layers on the compiled GEMM route at the last `installed` (see there)

    def to(self, device) -> LayerQuantizers:
        """Move the quantizers' state (amax, pre-quant scales) to `device`. Only the quantizers:
        the shadows' weight tensors are the model's own and stay where the host keeps them."""
        for shadow in self.shadows.values():
            for _, quantizer in quantizers_of(shadow):
                quantizer.to(device)
        self._codes.clear()
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
        `forward_loop()` runs the model with these quantizers installed (on the fake route)."""
        mtq = import_mtq()
        route, self.route = self.route, "fake"
        try:
            with no_weight_folding():
                mtq.calibrate(self.root, algorithm=self.config["algorithm"], forward_loop=lambda _root: forward_loop())
        finally:
            self.route = route
        self._restore_base_weights()
        self._make_weights_dynamic()
        self.calibrated = True
        self._codes.clear()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The quantizer state modelopt keeps in buffers (amax, pre-quant scales), by name."""
        out = {}
        for name, shadow in self.shadows.items():
            for kind, quantizer in quantizers_of(shadow):
                for buffer, value in quantizer.named_buffers(recurse=False):
                    out[f"{name}.{kind}.{buffer}"] = value.detach().cpu().float().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]):
        known = {f"{n}.{k}": q for n, s in self.shadows.items() for k, q in quantizers_of(s)}
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
        self._codes.clear()

    def describe_state(self) -> dict:
        return {"format": self.format.name, "layers": self.layers, "calibrated": self.calibrated,
                "algorithm": self.config["algorithm"] if self.calibrated else "dynamic"}

    def modelopt_state_json(self) -> str:
        """modelopt's own record of the conversion (config per quantizer), kept for inspection."""
        import modelopt.torch.opt as mto

        return json.dumps(mto.modelopt_state(self.root), default=str)

    def weight_pre_quant_scale(self, name: str):
        """The SmoothQuant / AWQ scale a layer's weight is quantized in the space of, or None."""
        return pre_quant_scale(self.shadows[name].weight_quantizer)

    @torch.no_grad()
    def quantized_weight(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(modelopt's fake-quantized weight of a layer, the weight range it used). The weight is
        in the space of its pre-quant scale if SmoothQuant / AWQ gave it one."""
        from modelopt.torch.quantization.model_calib import max_calibrate

        shadow = self.shadows[name]
        quantizer = shadow.weight_quantizer
        weight = weight.to(quantizer_device(shadow, weight.device))
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
            device = quantizer_device(self.shadows[name], module.weight.device)
            quantizer.amax = amax.to(device)
            try:
                snapped = quantizer(module.weight.detach().to(device))
            finally:
                del quantizer._amax
            smoothing = self.weight_pre_quant_scale(name)
            if smoothing is not None:
                snapped = snapped / smoothing.to(snapped)
            module.weight.copy_(snapped.to(module.weight.dtype))

    def forget_base_weights(self, name: str, module: nn.Module):
        """Point the shadow at the module's current parameters (after the module replaced them), so
        the bank holds no reference to the old ones."""
        self._base[name] = {k: v for k, v in module._parameters.items() if k in ("weight", "bias")}
        self._restore_layer(name, self.shadows[name])

    def _restore_base_weights(self):
        for name, shadow in self.shadows.items():
            self._restore_layer(name, shadow)

    def _restore_layer(self, name, shadow):
        for key, value in self._base[name].items():
            shadow._parameters[key] = value

    # -- compute

    def linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               weight_key=None) -> torch.Tensor:
        """One selected layer on input x with the host's current weight and bias.

        `weight_key` identifies this weight's version (None: not cacheable, e.g. low-VRAM patches
        computed per call): the real routes quantize a weight once per version. A layer stored
        compact (see `compact_layer`) runs on its codes through `compact_linear` instead."""
        shadow = self.shadows[name]
        if self.route in ("fp8", "int8") and gemm_shapes_ok(weight):
            try:
                return self._gemm(shadow, x, *self._weight_codes(name, weight, weight_key, x), bias)
            except RuntimeError as err:  # a torch / driver without this kernel: keep the run going
                self._give_up_real_route(name, err)
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
        if self.route not in ("fp8", "int8") or codes.dtype != CODE_DTYPES[self.route] or codes.device != x.device \
                or not gemm_shapes_ok(codes):
            return None
        try:
            return self._gemm(self.shadows[name], x, codes, scale, bias)
        except RuntimeError as err:
            self._give_up_real_route(name, err)
            return None

    def gemm_tensors(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, weight_key, x: torch.Tensor) -> dict:
        """What the real GEMM of a layer takes besides its input: the weight's codes and scale
        (made now unless cached for this version and an input like `x`), the bias, the
        calibrated input range and SmoothQuant's input scale (None where the layer has none)."""
        shadow = self.shadows[name]
        codes, scale = self._weight_codes(name, weight, weight_key, x)
        return {"w_q": codes, "w_scale": scale, "bias": None if bias is None else bias.detach(),
                "input_amax": static_amax(shadow.input_quantizer), "input_scale": pre_quant_scale(shadow.input_quantizer)}

    def last_input(self, name: str) -> tuple[torch.dtype, torch.device] | None:
        """The dtype and device of the input a layer's cached codes were made with, if any."""
        cached = self._codes.get(name)
        return None if cached is None else (cached[3], cached[4])

    def cached_bytes(self) -> int:
        """Bytes of the weight codes the real routes keep beside the weights."""
        return sum(c[1].numel() * c[1].element_size() for c in self._codes.values())

    def forget_weight_codes(self):
        """Drop the cached codes (their layers' weights or ranges changed)."""
        self._codes.clear()

    def installed(self, model: nn.Module, weights=None):
        """Route the selected layers of `model` through these quantizers inside a `with` block
        (see `install.installed`); `weights(module, x) -> (weight, bias, key)` gives a layer's
        current weight (default: its parameters as they are)."""
        return install.installed(self, model, weights)

    def _give_up_real_route(self, name, err):
        log.warning("FastGen quantize: the %s GEMM failed on %s (%s); running fake-quant from now on",
                    self.route, name, str(err).splitlines()[0][:200])
        self.route, self.fallback = "fake", str(err).splitlines()[0][:200]

    def _weight_codes(self, name, weight, weight_key, x):
        """(codes, scale) of a layer's weight for the real GEMM: made once per weight version
        (`weight_key`; None: not cached) and route."""
        cached = self._codes.get(name)
        if cached is None or weight_key is None or cached[0] != weight_key or cached[1].dtype != CODE_DTYPES[self.route]:
            smoothing = self.weight_pre_quant_scale(name)
            w = weight if smoothing is None else weight * smoothing.to(weight)
            codes, scale = compress_weight(w, self.route)
            cached = (weight_key, codes, scale.reshape(-1), x.dtype, x.device)
            if weight_key is not None:
                self._codes[name] = cached
        return cached[1], cached[2]

    def _gemm(self, shadow, x, w_q, w_scale, bias):
        scale = pre_quant_scale(shadow.input_quantizer)
        x = x if scale is None else x * scale.to(x)
        input_amax = static_amax(shadow.input_quantizer)
        if self.route == "fp8":
            return fp8_linear(x, w_q, w_scale, bias, input_amax)
        return int8_linear(x, w_q, w_scale, bias, input_amax)


def quantize_model(model: nn.Module, fmt: str = "fp8", pattern: str = "", forward_loop=None) -> LayerQuantizers:
    """Quantizers for `model` (its default layers, or `pattern`), calibrated when given a
    `forward_loop()` that runs the model under `bank.installed(model)`."""
    fmt_spec = get_format(fmt)
    param = next(model.parameters(), None)
    check_format_runs(fmt_spec, param.device if param is not None else torch.device("cpu"))
    bank = LayerQuantizers(model, fmt, select_layers(model, pattern))
    if forward_loop is not None:
        bank.calibrate(forward_loop)
    elif fmt_spec.needs_calibration:
        raise ValueError(f"{fmt} needs a calibration run (it searches scales on real activations): give calibration inputs")
    return bank
