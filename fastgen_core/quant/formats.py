"""The quantization formats: the modelopt preset each starts from, the codes its weights are
stored as, the hardware it needs, and the GEMM route a device gives it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODELOPT_HELP = "pip install nvidia-modelopt (needs torch >= 2.8 and requests)"

# The 8-bit codes a real low-precision GEMM takes (the "fp8" / "int8" routes), by code name.
CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
INT4_BLOCK = 128  # the int4 formats' block size (modelopt's INT4_BLOCKWISE / AWQ configs)


def import_mtq():
    """modelopt's quantization package (slow to import: ~5 s, so only when a quantizer is built)."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise RuntimeError(f"Quantization needs nvidia-modelopt, which is not installed or failed to import ({err}): "
                           f"{MODELOPT_HELP}") from None
    return mtq


@dataclass(frozen=True)
class QuantFormat:
    name: str
    preset: str  # the modelopt config this format starts from
    weight_bits: int
    # The one switch for compressed storage: "fp8" / "int8" / "int4", the codes this format's
    # weights are held as in a saved file and in a compact layer; None: they stay as they are.
    codes: str | None
    needs_calibration: bool = False  # SmoothQuant and AWQ search scales on real activations
    min_capability: tuple[int, int] | None = None  # hardware needed even to run it
    description: str = ""

    @property
    def gemm(self) -> str | None:
        """The real low-precision GEMM ("fp8" / "int8") that takes this format's codes; None: none does."""
        return self.codes if self.codes in CODE_DTYPES else None


FORMATS = {
    f.name: f
    for f in (
        QuantFormat("fp8", "FP8_DEFAULT_CFG", 8, "fp8", description="fp8 e4m3 weights and activations, per-tensor scales"),
        QuantFormat("int8", "INT8_DEFAULT_CFG", 8, "int8", description="int8 weights per output channel, int8 activations per tensor"),
        QuantFormat("int8_smoothquant", "INT8_SMOOTHQUANT_CFG", 8, "int8", needs_calibration=True,
                    description="int8 with SmoothQuant's per-channel activation smoothing (needs calibration)"),
        QuantFormat("int4", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 4, "int4",
                    description="int4 weight-only, blocks of 128 (memory, no int4 GEMM in torch)"),
        QuantFormat("int4_awq", "INT4_AWQ_CFG", 4, "int4", needs_calibration=True,
                    description="int4 weight-only with AWQ-lite scale search (needs calibration)"),
        QuantFormat("nvfp4", "NVFP4_DEFAULT_CFG", 4, None, min_capability=(10, 0),
                    description="NVFP4 (4-bit float, blocks of 16): NVIDIA Blackwell only"),
    )
}


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


def choose_route(fmt: QuantFormat, device: torch.device) -> tuple[str, str]:
    """(route, why): "fp8" / "int8" for a real GEMM on this device, else "fake" with the reason."""
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
