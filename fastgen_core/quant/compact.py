"""Weights held as codes: modelopt's packed fp8 / int8 / int4 codes of a weight, and compact
layers, which keep those codes in memory in place of the values (for a model this code owns: a
loaded quantized file). A compact layer carries the host's hooks for low-precision weights, so
the host's LoRA patching reaches it at the stored scales."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .formats import CODE_DTYPES, INT4_BLOCK, QuantFormat

if TYPE_CHECKING:
    from .quantizers import LayerQuantizers


def compress_weight(weight: torch.Tensor, codes: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scale) of a weight by modelopt's QTensors, in modelopt's layout: "fp8" one
    scale per tensor (shape []), "int8" one per output channel ([N, 1]), "int4" two weights a
    byte with one scale per block of 128 ([blocks, 1])."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT4QTensor, INT8QTensor

    if codes == "fp8":
        qtensor, scale = FP8QTensor.quantize(weight, axis=None)
    elif codes == "int8":
        qtensor, scale = INT8QTensor.quantize(weight, axis=0)
    elif codes == "int4":
        qtensor, scale = INT4QTensor.quantize(weight, block_size=INT4_BLOCK)
    else:
        raise ValueError(f"no codes {codes!r}: choose fp8, int8 or int4")
    return qtensor._quantized_data.contiguous(), scale.float().contiguous()


def int4_values(codes: torch.Tensor, scale: torch.Tensor, shape=None) -> torch.Tensor:
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


def compact_kind(fmt: QuantFormat, weight: torch.Tensor) -> str | None:
    """The in-memory code a layer of `fmt` can be held as: "fp8" / "int8" (1 byte a weight, fed
    to the GEMM), "int4" (two weights a byte in blocks of 128, dequantized per call), or None."""
    if fmt.codes in CODE_DTYPES:
        return fmt.codes
    if fmt.codes == "int4" and weight.ndim == 2 and weight.shape[-1] % INT4_BLOCK == 0:
        return "int4"
    return None


def compact_layer(module: nn.Linear, fmt: QuantFormat, values: torch.Tensor | None = None) -> bool:
    """Store a layer's weight compressed in memory (fp8 / int8 codes + float32 scale: half of
    bf16; int4: modelopt's packed blockwise codes, a quarter). The layer gets the host's hooks for
    low-precision weights, `convert_weight` (codes -> values) and `set_weight` (values -> codes
    with the stored scales), through which the host's LoRA patching reaches it; `dequantized`
    gives the values for a forward. False for formats with no compact code (nvfp4)."""
    weight = module.weight.detach() if values is None else values
    kind = compact_kind(fmt, weight)
    if kind is None:
        return False
    codes, scale = compress_weight(weight.float() if kind == "int4" else weight, kind)
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
        return int4_values(weight, module.weight_scale).to(dtype)
    return (weight.float() * module.weight_scale.to(weight.device).float()).to(dtype)


def compact_codes(module: nn.Module, route: str):
    """(codes, scale) of a compact layer for the real GEMM of `route`, or None."""
    if getattr(module, "compact_format", None) != route or getattr(module, "weight_function", None):
        return None
    return module.weight, module.weight_scale.reshape(-1)


def _convert_weight(self, weight, inplace=False, **kwargs):
    if self.compact_format == "int4":  # a new tensor: values have twice the packed width
        return int4_values(weight, self.weight_scale).to(weight.dtype)
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


def compact_layers(model: nn.Module, bank: LayerQuantizers, ranges: dict | None = None) -> list[str]:
    """`compact_layer` for every layer of `bank`, from its fake-quantized weight (so the codes are
    modelopt's own rounding); their weight quantizers keep that range from now on (`ranges`: the
    ones a loaded file's weights were snapped with). Layers with a SmoothQuant / AWQ scale stay as
    they are."""
    done = []
    for name in bank.layers:
        module = model.get_submodule(name)
        if bank.weight_pre_quant_scale(name) is None and compact_kind(bank.format, module.weight) is not None:
            values, weight_range = bank.quantized_weight(name, module.weight.detach())
            compact_layer(module, bank.format, values.to(module.weight.device))
            # the codes' scale is fixed now (the host adds LoRAs with it), so the weight quantizer
            # takes the same fixed range: it then reproduces the saved values bit for bit
            saved = (ranges or {}).get(name)  # a loaded file's: the range its weights were snapped with
            bank.shadows[name].weight_quantizer.amax = weight_range if saved is None else saved.to(weight_range)
            bank.forget_base_weights(name, module)  # so the full-precision weights can be freed
            done.append(name)
    bank.forget_weight_codes()
    return done


def layer_memory(model: nn.Module, layers: list[str], bits: int) -> tuple[int, int]:
    """(bytes of the selected weights as they are held — a compact layer's codes and scales —,
    bytes at `bits` per weight)."""
    modules = [model.get_submodule(n) for n in layers]
    now = sum(m.weight.nbytes + (m.weight_scale.nbytes if hasattr(m, "weight_scale") else 0) for m in modules)
    return now, sum(m.weight.numel() * bits // 8 for m in modules)
