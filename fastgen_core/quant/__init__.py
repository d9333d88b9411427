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

At run time a wrapper around the diffusion model (see `LayerQuantizers.installed`) routes each
selected layer through its shadow for the duration of one forward: the host's *current* weight —
with every LoRA patch already applied, whatever the order of the LoRA and quantize nodes in the
graph — is handed to the shadow, whose modelopt quantizers quantize it and the activations. Weight
scales are dynamic (recomputed from the weight it is given, so a LoRA's delta is never clipped to
the base weight's range); activation scales are dynamic per call unless a calibration run fixed them.

Three GEMM routes, chosen per device and format (`choose_route`):
- "fp8": fp8 e4m3 weights (quantized once per weight version and cached) and per-call fp8
  activations through `torch._scaled_mm` (NVIDIA SM >= 8.9: Ada, Hopper, Blackwell);
- "int8": int8 weights (per output channel) and activations through `torch._int_mm`
  (NVIDIA SM >= 8.0);
- "fake": modelopt's quantize-dequantize in the original precision: the accuracy of the format,
  no speedup (CPU, older GPUs, int4 weight-only, nvfp4 until its GEMM is wired).
On a model the host owns, the originals stay resident so that LoRAs can keep patching them at full
range, and the cached low-precision copies add memory. The saving comes from `save_quantized` (on
disk) and `compact_layers` (in memory, for a model loaded from such a file: fp8 / int8 / int4 codes
with the host's hooks for low-precision weights, through which LoRAs are added at the saved
scales). Which codes a format's weights are stored as is one field, `QuantFormat.codes`.

Modules, one job each:
  formats     the formats, their codes, the hardware they need, the GEMM route of a device
  layers      which Linear layers are quantized (per-architecture defaults, glob patterns)
  shadows     modelopt plumbing: host Linear classes registered, configs, the shadows modelopt converts
  quantizers  the bank of shadow quantizers: calibration, state, one layer's compute by its route
  install     the installed layers' forwards (eager, and inside torch.compile'd graphs)
  kernels     fp8 / int8 GEMMs and the activation cast, compiled with an eager fallback
  compact     weights as codes: compression, compact layers and the host's LoRA hooks on them
  files       quantized model files: save, load with checks, restore the quantizers
"""

from .compact import compact_codes, compact_kind, compact_layer, compact_layers, compress_weight, dequantized, layer_memory
from .files import (
    FORMAT_VERSION,
    QUANT_KEY,
    RANGE_PREFIX,
    STATE_PREFIX,
    WEIGHT_DTYPES,
    compress_for_file,
    decompress_from_file,
    load_quantized,
    read_quant_info,
    restore_quantizers,
    save_quantized,
)
from .formats import (
    CODE_DTYPES,
    FORMATS,
    INT4_BLOCK,
    MODELOPT_HELP,
    QuantFormat,
    check_format_runs,
    choose_route,
    get_format,
    import_mtq,
)
from .kernels import CompiledOrEager, activation_codes, fp8_linear, fused, int8_linear
from .layers import DEFAULT_LAYERS, KEEP_WORDS, architecture_names, default_layer, linear_layers, parse_pattern, select_layers
from .quantizers import LayerQuantizers, quantize_model
from .shadows import modelopt_config, register_linear_classes

__all__ = [
    "CODE_DTYPES", "DEFAULT_LAYERS", "FORMATS", "FORMAT_VERSION", "INT4_BLOCK", "KEEP_WORDS", "MODELOPT_HELP", "QUANT_KEY",
    "RANGE_PREFIX", "STATE_PREFIX", "WEIGHT_DTYPES", "CompiledOrEager", "LayerQuantizers", "QuantFormat", "activation_codes",
    "architecture_names", "check_format_runs", "choose_route", "compact_codes", "compact_kind", "compact_layer", "compact_layers",
    "compress_for_file", "compress_weight", "decompress_from_file", "default_layer", "dequantized", "fp8_linear", "fused",
    "get_format", "import_mtq", "int8_linear", "layer_memory", "linear_layers", "load_quantized", "modelopt_config",
    "parse_pattern", "quantize_model", "read_quant_info", "register_linear_classes", "restore_quantizers", "save_quantized",
    "select_layers",
]
