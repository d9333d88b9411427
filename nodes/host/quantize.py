"""The quantize patch on the host: the APPLY_MODEL wrapper that routes the selected Linear layers
through the quantizers held beside the model, and how a MODEL carries them."""

from __future__ import annotations

import comfy.ops
import comfy.patcher_extension
import comfy.sample
import torch

from ...fastgen_core import quant

WRAPPER_KEY = "fastgen_quant"
ATTACHMENT_KEY = "fastgen_quant"  # the LayerQuantizers of a quantized MODEL (read by the save node)


class QuantizeWrapper:
    """APPLY_MODEL wrapper (every host model runs BaseModel.apply_model; not every diffusion model
    class calls DIFFUSION_MODEL wrappers): the selected layers run quantized inside each call."""

    def __init__(self, bank: quant.LayerQuantizers, base_model):
        self.bank = bank
        self.base_model = base_model  # the host BaseModel: its patch uuid versions the weights

    def __call__(self, executor, *args, **kwargs):
        with self.bank.installed(executor.class_obj.diffusion_model, weights=self.host_weights):
            return executor(*args, **kwargs)

    def host_weights(self, module, x):
        """The weight and bias the host would use for this layer now, and a key for the real
        routes' cache of quantized weights (None while low-VRAM patches are computed per call)."""
        weight, bias = host_weight_and_bias(module, x)
        if getattr(module, "weight_function", None):
            return weight, bias, None
        key = (module.weight.data_ptr(), module.weight.device, x.dtype, getattr(self.base_model, "current_weight_patches_uuid", None))
        return weight, bias, key


def host_weight_and_bias(module, x):
    """As the host casts them for input x (device, dtype, low-VRAM LoRA patches); a compact
    layer's codes as values."""
    if hasattr(module, "comfy_cast_weights"):
        weight, bias = comfy.ops.cast_bias_weight(module, x)
    else:
        weight, bias = module.weight, None if module.bias is None else module.bias.to(x)
    return quant.dequantized(module, weight, x.dtype), bias


class CompactForward:
    """A compact layer run outside the quantize wrapper (a pass that skips MODEL wrappers):
    the stored codes dequantized, as a plain Linear."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x, *args, **kwargs):
        weight, bias = host_weight_and_bias(self.module, x)
        return torch.nn.functional.linear(x, weight, bias)


def quantize_layers(diffusion_model, fmt: str, pattern: str) -> quant.LayerQuantizers:
    quant.import_mtq()  # the clear "install nvidia-modelopt" error first
    layers = quant.select_layers(diffusion_model, pattern)
    return quant.LayerQuantizers(diffusion_model, fmt, layers)


def attach(model, bank: quant.LayerQuantizers):
    """A clone of `model` that runs quantized through `bank`, and the text saying how."""
    device = model.load_device
    route, why = quant.choose_route(bank.format, device)
    bank.route = route
    bank.to(device)
    patched = model.clone()
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, QuantizeWrapper(bank, model.model))
    patched.attachments[ATTACHMENT_KEY] = bank
    return patched, report(model, bank, route, why)


def report(model, bank: quant.LayerQuantizers, route: str, why: str) -> str:
    diffusion_model = model.model.diffusion_model
    total = len(quant.linear_layers(diffusion_model))
    now, packed = quant.layer_memory(diffusion_model, bank.layers, bank.format.weight_bits)
    lines = [f"{bank.format.name} on {len(bank.layers)} of {total} Linear layers "
             f"({'calibrated, ' + bank.config['algorithm'] if bank.calibrated else 'dynamic scaling, no calibration'})"]
    if all(getattr(diffusion_model.get_submodule(n), "compact_format", None) for n in bank.layers):
        codes = "straight on the stored codes" if route in ("fp8", "int8") else "dequantized from the stored codes per call"
        lines.append(f"{why} on {len(bank.layers)} layers, {codes}: {now / 2**20:.1f} MiB of weights")
    elif route in ("fp8", "int8"):
        lines.append(f"{why} on {len(bank.layers)} layers")
        lines.append(f"quantized weights cached on the device: +{packed / 2**20:.1f} MiB beside the originals "
                     f"({now / 2**20:.1f} MiB), which stay so that LoRAs can patch them")
    else:
        lines.append(why)
        lines.append(f"these weights: {now / 2**20:.1f} MiB as loaded, {packed / 2**20:.1f} MiB in a saved file "
                     f"({now / max(packed, 1):.1f}x smaller); here they stay as loaded (Save + Load Quantized Model "
                     "with compact on holds fp8 / int8 / int4 layers compressed)")
    kept = total - len(bank.layers)
    lines.append(f"kept in high precision: the other {kept} Linear layers and all norms")
    return "\n".join(lines)


def calibration_loop(model, positive, latent, steps: int, seed: int):
    """A few sampling steps on the graph's own conditioning (cfg 1: positive only)."""
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))

    def run():
        comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, samples,
                            denoise=1.0, disable_pbar=True, seed=seed)

    return run
