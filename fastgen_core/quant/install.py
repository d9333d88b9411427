"""Replacing forwards: the selected layers of a model compute through a `LayerQuantizers` bank for
the duration of a `with` block, eagerly or inside torch.compile'd graphs, and are put back
exactly as they were when it ends."""

from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch import nn

from .compact import compact_codes, dequantized
from .kernels import fp8_linear, gemm_shapes_ok, int8_linear

log = logging.getLogger("fastgen")

_PREFIX = "_fastgen_"  # the per-layer buffers of a compiled forward (installed / _layer_forward)
_EAGER, _DTYPE = "_fastgen_eager", "_fastgen_dtype"
_BUFFERS = tuple(f"{_PREFIX}{k}" for k in ("w_q", "w_scale", "bias", "input_amax", "input_scale"))
_MISSING = object()


@contextlib.contextmanager
def installed(bank, model: nn.Module, weights=None):
    """Route the selected layers of `model` through `bank` inside the block.

    `weights(module, x) -> (weight, bias, key)` gives a layer's current weight (default: its
    parameters as they are). The forward is swapped on the module instances only for the
    block, so other users of the same model are unaffected outside it.

    Every layer gets the same forward function (`_layer_forward`), so torch.compile traces one
    graph for all of them. On the real GEMM routes a layer whose weight has a cache key also
    gets its compressed weight (made now if not cached) and the other per-layer tensors as
    non-persistent buffers: a compiled forward runs its GEMM inside the graph, with these
    tensors as graph inputs. They are the weight of entry time: a weight changed inside the
    block reaches eager calls only (the node enters this per model call). Everything else (and
    every eager call) goes through the eager `_QuantForward`. `bank.compiled_layers` counts the
    layers with a compiled forward at the last entry."""
    weights = weights or plain_weights
    installs = []
    bank.compiled_layers = 0
    try:
        for name in bank.layers:
            module = model.get_submodule(name)
            installs.append(_Install(module))
            module.__dict__[_EAGER] = _QuantForward(bank, name, module, weights)
            try:
                graph = _graph_inputs(bank, name, module, weights)
            except Exception as err:  # noqa: BLE001 - the eager forward works without it: never fail the run here
                log.debug("FastGen quantize: no compiled forward for %s (%s)", name, err)
                graph = None
            # bound methods of two shared functions: dynamo guards on the function, not on the layer
            module.forward = types.MethodType(_eager_layer if graph is None else _layer_forward, module)
            if graph is not None:
                tensors, dtype = graph
                for key, value in tensors.items():
                    module.register_buffer(key, value, persistent=False)
                module.__dict__[_DTYPE] = dtype
                bank.compiled_layers += 1
        yield bank
    finally:
        for install in reversed(installs):
            install.restore()


def _graph_inputs(bank, name, module, weights) -> tuple[dict[str, torch.Tensor], torch.dtype] | None:
    """The tensors through which a compiled forward runs one layer's real GEMM (`_layer_forward`),
    and the input dtype they are for; None where the layer stays eager (fake-quant, a compact
    layer, a weight without a cache key such as low-VRAM patches or on another device than its
    inputs, widths the GEMM cannot take). The codes are made here if the bank has none for the
    layer's current weight: for the dtype and device of the last input, or at first the weight's own."""
    if bank.route not in ("fp8", "int8") or getattr(module, "compact_format", None) or module.weight.ndim != 2:
        return None
    dtype, device = bank.last_input(name) or (module.weight.dtype, module.weight.device)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):  # e.g. an fp8 checkpoint's weight: learn x first
        return None
    probe = torch.empty((0, module.weight.shape[1]), dtype=dtype, device=device)  # no data: the weights' dtype and device
    weight, bias, key = weights(module, probe)
    if key is None or weight.device != probe.device or not gemm_shapes_ok(weight):
        return None
    tensors = bank.gemm_tensors(name, weight, bias, key, probe)
    return {f"{_PREFIX}{k}": v for k, v in tensors.items() if v is not None}, dtype


class _Install:
    """What `installed` changes on one module, to put back exactly: its instance attributes
    (forward, the eager forward, the input dtype) and the buffers of the compiled forward."""

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
# torch.compile (a compiled block calls it eagerly, a graph break): fake-quant's round trips
# must not be folded by inductor, and the bank's code cache is Python state. One function for
# every layer (the module is its argument), so no per-layer guard either.
@torch.compiler.disable
def _eager_layer(module, x, *args, **kwargs):
    return module.__dict__[_EAGER](x, *args, **kwargs)


class _QuantForward:
    """One layer's eager quantized forward (any route: fake-quant, compact codes, the real GEMMs
    with the weight quantized once per version)."""

    def __init__(self, bank, name, module, weights):
        self.bank, self.name, self.module, self.weights = bank, name, module, weights

    @torch.compiler.disable
    def __call__(self, x, *args, **kwargs):
        compressed = compact_codes(self.module, self.bank.route)
        if compressed is not None:  # codes as stored: no per-call dequantized copy of the weight
            bias = self.module.bias
            out = self.bank.compact_linear(self.name, x, *compressed, None if bias is None else bias.to(x.dtype))
            if out is not None:
                return out
        weight, bias, key = self.weights(self.module, x)
        return self.bank.linear(self.name, x, weight, bias, key)


def plain_weights(module: nn.Module, x: torch.Tensor):
    """A layer's weight and bias as its parameters hold them (a compact layer's as values), in
    x's dtype, keyed by the weight tensor and its version."""
    weight = dequantized(module, module.weight, x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return weight, bias, (id(module.weight), module.weight._version)
