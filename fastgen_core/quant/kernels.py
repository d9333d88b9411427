"""The real low-precision GEMMs: fp8 through torch._scaled_mm, int8 through torch._int_mm, with
the activations cast to codes per call by modelopt's QTensors, that cast compiled by
torch.compile where it can be (and eager where compiling fails)."""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("fastgen")


def gemm_shapes_ok(weight) -> bool:
    """cuBLAS low-precision GEMMs want dimensions in multiples of 16 (int8 also more than 16
    rows: `int8_linear` pads fewer)."""
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0


def activation_codes(x2: torch.Tensor, amax, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, per-tensor float32 scale) of an activation by modelopt's QTensors: dynamic range
    (`reduce_amax`) unless a calibration fixed it, then saturated to it as fake-quant does.

    Pure tensor code with no host sync, so `fused` can compile it into two passes over x (one
    reduction, one cast); eager, modelopt's reduce / divide / cast take about five, which on a
    Hopper cost as much as the fp8 GEMM saves."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor
    from modelopt.torch.quantization.utils import reduce_amax

    qmax = 448.0 if fmt == "fp8" else 127.0
    if amax is None:  # per row, then over rows: a parallel reduction (compiled with dynamic shapes,
        # one reduction straight to a scalar runs on few blocks)
        scale = (reduce_amax(x2, axis=-1).max().float() / qmax).clamp_min(1e-12)
    else:  # per tensor, also from a per-channel calibrated range
        limit = amax.to(x2.device).float().max()
        scale = (limit / qmax).clamp_min(1e-12)
        x2 = torch.minimum(torch.maximum(x2, -limit.to(x2.dtype)), limit.to(x2.dtype))
    qtensor = FP8QTensor if fmt == "fp8" else INT8QTensor
    return qtensor.quantize(x2, scales=scale)[0]._quantized_data, scale


def int8_epilogue(acc: torch.Tensor, x_scale, w_scale, bias, dtype) -> torch.Tensor:
    """int32 GEMM accumulators -> dtype: per-tensor activation scale x per-channel weight scale, + bias."""
    out = acc.to(torch.float32) * (x_scale * w_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def fused(fn, x: torch.Tensor):
    """`fn` compiled by torch.compile on CUDA (its elementwise passes fused by inductor), eager
    elsewhere, eager for good if compiling fails here (no Triton, no compiler). Shapes are
    dynamic: one compiled kernel set serves every layer width and token count.
    FASTGEN_QUANT_COMPILE=0 turns it off."""
    if x.device.type != "cuda" or torch.compiler.is_compiling() or os.environ.get("FASTGEN_QUANT_COMPILE", "1") == "0":
        return fn  # (inside a compiled graph, inductor fuses it with the rest)
    return _compiled(fn)


@functools.cache
def _compiled(fn) -> CompiledOrEager:
    """One compiled wrapper per function for the process: every layer shares its kernels."""
    return CompiledOrEager(fn)


class CompiledOrEager:
    """`fn` through torch.compile, falling back to `fn` itself for good at the first failure."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, torch.compile(fn, dynamic=True)

    def __call__(self, *args):
        if self.compiled is None:
            return self.fn(*args)
        # Plain aliases, not views: outside inference mode a reshaped activation is a view, and
        # dynamo guards on its base's sizes (a guard that would fail and recompile per call site)
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
    x_fp8, x_scale = fused(activation_codes, x)(x2, input_amax, "fp8")
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.reshape(()),
                           bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return out.to(x.dtype).reshape(*shape[:-1], -1)


def int8_linear(x, w_int8, w_scale, bias=None, input_amax=None):
    """y = x W^T + b with int8 operands through torch._int_mm (int32 accumulation), rescaled per
    tensor (activations) and per output channel (weights, `w_scale` of shape [N])."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_int8, x_scale = fused(activation_codes, x)(x2, input_amax, "int8")
    rows = x_int8.shape[0]
    if rows <= 16:  # cuBLAS's int8 GEMM takes more than 16 rows: zero rows, cut off again
        x_int8 = torch.nn.functional.pad(x_int8, (0, 0, 0, 32 - rows))
    try:
        acc = torch._int_mm(x_int8, w_int8.t())
    except RuntimeError:  # a build that wants the second operand row-major
        acc = torch._int_mm(x_int8, w_int8.t().contiguous())
    acc = acc[:rows]
    out = fused(int8_epilogue, x)(acc, x_scale, w_scale.to(acc.device), bias, x.dtype)
    return out.reshape(*shape[:-1], -1)
