"""#5 in the real host: FastGen Quantize Model on the embedded MODEL and on a tiny random Wan 2.1
through KSampler, LoRAs before and after it, Save / Load Quantized Model."""

import copy
import json

import pytest
import torch
from prompts import failure, node_text, run_latent, teacher_prompt

pytest.importorskip("modelopt.torch.quantization")

LORA = "digit_test_lora.safetensors"


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def psnr(a, b, value_range=2.0):
    return (10 * torch.log10(value_range**2 / (a - b).pow(2).mean())).item()


def digits_graph(object_info, patch_nodes=None, model_link=None):
    """The embedded teacher (digits 0-9, 8 steps, cfg 3) with `patch_nodes` between the model and
    the KSampler, saving the latent. Returns (prompt, ids)."""
    prompt, ids = teacher_prompt(object_info, seed=11, digits="0123456789", batch_size=10)
    prompt = {k: v for k, v in prompt.items() if v["class_type"] not in ("VAEDecode", "PreviewImage", "VAELoader")}
    prompt.update(copy.deepcopy(patch_nodes or {}))
    if model_link is not None:
        prompt[ids["KSampler"]]["inputs"]["model"] = model_link
    prompt["out"] = {"class_type": "SaveLatent", "inputs": {"samples": [ids["KSampler"], 0], "filename_prefix": "latents/quant"}}
    return prompt, ids


def quantize(model_link, fmt="fp8", layers="", calibrate=False, **extra):
    return {"class_type": "FastGenQuantizeModel",
            "inputs": {"model": model_link, "format": fmt, "layers": layers, "calibrate": calibrate, "steps": 2, **extra}}


def lora(model_link, name=LORA, strength=1.0):
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model_link, "lora_name": name, "strength_model": strength}}



def digits(comfy, object_info, nodes=None, link=None):
    prompt, _ = digits_graph(object_info, nodes, link)
    return run_latent(comfy, prompt)


def test_quantize_node_on_the_embedded_model_through_ksampler(comfy, object_info):
    plain, _ = digits(comfy, object_info)
    _, ids = digits_graph(object_info)
    model = [ids["FastGenLoadModel"], 0]
    for fmt, min_psnr in (("fp8", 25.0), ("int8", 28.0)):
        quantized, entry = digits(comfy, object_info, {"q": quantize(model, fmt)}, ["q", 0])
        text = node_text(entry, "q")
        assert f"{fmt} on 24 of 36 Linear layers" in text, text
        assert "fake-quant: accuracy preview only, no speedup on CPU" in text
        assert min_psnr <= psnr(quantized, plain) < 60, (fmt, psnr(quantized, plain))


def test_a_lora_before_or_after_the_quantize_node_still_changes_the_output(comfy, object_info):
    """Tolerance: with the LoRA, quantization moves the output no more than 2.5x as far as it
    does without the LoRA, while the LoRA moves it several times further; both orders agree."""
    _, ids = digits_graph(object_info)
    model = [ids["FastGenLoadModel"], 0]
    plain, _ = digits(comfy, object_info)
    with_lora, _ = digits(comfy, object_info, {"l": lora(model, strength=0.5)}, ["l", 0])
    quantized, _ = digits(comfy, object_info, {"q": quantize(model, "int8")}, ["q", 0])
    lora_then_quant, _ = digits(comfy, object_info, {"l": lora(model, strength=0.5), "q": quantize(["l", 0], "int8")}, ["q", 0])
    quant_then_lora, _ = digits(comfy, object_info, {"q": quantize(model, "int8"), "l": lora(["q", 0], strength=0.5)}, ["l", 0])

    quantization_error = relative_error(quantized, plain)
    lora_effect = relative_error(with_lora, plain)
    print(f"int8 error {quantization_error:.4f}, LoRA effect {lora_effect:.4f}")
    assert lora_effect > 4 * quantization_error, "the test LoRA should change the digits far more than quantization"
    for name, result in (("before", lora_then_quant), ("after", quant_then_lora)):
        error = relative_error(result, with_lora)
        print(f"LoRA {name} the node: {error:.4f} from the unquantized LoRA output, {relative_error(result, quantized):.4f} from no LoRA")
        assert error < 2.5 * quantization_error, (name, error, quantization_error)  # measured 0.142 vs 0.073
        assert relative_error(result, quantized) > 0.5 * lora_effect
    torch.testing.assert_close(lora_then_quant, quant_then_lora, rtol=0, atol=1e-5)


def test_calibration_run_on_the_graphs_conditioning(comfy, object_info):
    prompt, ids = digits_graph(object_info)
    cond, latent = ids["FastGenDigitConditioning"], ids["EmptyChromaRadianceLatentImage"]
    nodes = {"q": quantize([ids["FastGenLoadModel"], 0], "int8_smoothquant", calibrate=True,
                           positive=[cond, 0], latent=[latent, 0], seed=0)}
    calibrated, entry = digits(comfy, object_info, nodes, ["q", 0])
    assert "int8_smoothquant on 24 of 36 Linear layers (calibrated, smoothquant)" in node_text(entry, "q")
    plain, _ = digits(comfy, object_info)
    assert psnr(calibrated, plain) > 20


def test_bad_settings_are_refused_with_the_reason(comfy, object_info):
    _, ids = digits_graph(object_info)
    model = [ids["FastGenLoadModel"], 0]
    message = failure(comfy, digits_graph(object_info, {"q": quantize(model, layers="blocks.*.mlp")}, ["q", 0])[0])
    assert "'blocks.*.mlp' matches no Linear layer" in message
    message = failure(comfy, digits_graph(object_info, {"q": quantize(model, "nvfp4")}, ["q", 0])[0])
    assert "nvfp4 needs an NVIDIA Blackwell GPU" in message and "CPU" in message
    message = failure(comfy, digits_graph(object_info, {"q": quantize(model, "int4_awq")}, ["q", 0])[0])
    assert "turn calibrate on" in message
    save = {"s": {"class_type": "FastGenSaveQuantizedModel", "inputs": {"model": model, "save_name": "x", "overwrite": False}}}
    message = failure(comfy, {**digits_graph(object_info)[0], **save})
    assert "not quantized" in message


def test_save_then_load_gives_the_same_digits(comfy, object_info):
    _, ids = digits_graph(object_info)
    model = [ids["FastGenLoadModel"], 0]
    nodes = {"q": quantize(model, "int8"),
             "s": {"class_type": "FastGenSaveQuantizedModel",
                   "inputs": {"model": ["q", 0], "save_name": "fastgen/test_digits_int8", "overwrite": True}}}
    in_graph, entry = digits(comfy, object_info, nodes, ["q", 0])
    assert "saved fastgen/test_digits_int8.safetensors" in node_text(entry, "s")
    assert "as models/unet/fastgen/test_digits_int8.safetensors" in node_text(entry, "s")
    options = comfy.get("/object_info/FastGenLoadQuantizedModel")["FastGenLoadQuantizedModel"]["input"]["required"]["model_name"][1]
    assert "fastgen/test_digits_int8.safetensors" in options["options"]
    def load(compact):
        nodes = {"ld": {"class_type": "FastGenLoadQuantizedModel",
                        "inputs": {"model_name": "fastgen/test_digits_int8.safetensors", "compact": compact}}}
        return digits(comfy, object_info, nodes, ["ld", 0])

    loaded, entry = load(compact=False)
    assert "int8 on 24 of 36 Linear layers" in node_text(entry, "ld")
    torch.testing.assert_close(loaded, in_graph, rtol=0, atol=1e-5)
    compact, entry = load(compact=True)
    text = node_text(entry, "ld")
    # the host runs fp32 on CPU: 4 bytes a weight -> 1 byte + a float32 scale per output channel
    assert "compact: 24 layers held as int8 codes" in text and "3.9x smaller" in text, text
    torch.testing.assert_close(compact, in_graph, rtol=0, atol=1e-5)
    bad = {"s": {"class_type": "FastGenSaveQuantizedModel", "inputs": {"model": ["q", 0], "save_name": "../escape", "overwrite": True}}}
    long = {"s": {**bad["s"], "inputs": {**bad["s"]["inputs"], "save_name": "q" * 300}}}
    for graph, reason in ((bad, "'..' part"), (long, "bytes long")):
        # refused when the prompt is validated, before anything is quantized (the graph's other
        # outputs still run, as the host does for a prompt with one invalid output)
        _, body = comfy.post("/prompt", {"prompt": {**digits_graph(object_info, {"q": quantize(model, "int8")})[0], **graph}})
        assert reason in json.dumps(body.get("node_errors", {}).get("s", {})), body


def test_saved_file_keeps_the_models_dtypes_and_says_where_it_went(comfy, object_info):
    """The embedded teacher is an fp16 file that the CPU host computes in float32: its fp8 file
    stores the layers left unquantized as fp16 again (smaller than the original, not larger), and
    the node names the folder it wrote to (the host's first diffusion_models folder, models/unet)."""
    import os

    from safetensors import safe_open

    from fastgen_core.eval import ASSETS
    from fastgen_core.quant import RANGE_PREFIX, STATE_PREFIX

    _, ids = digits_graph(object_info)
    nodes = {"q": quantize([ids["FastGenLoadModel"], 0], "fp8"),
             "s": {"class_type": "FastGenSaveQuantizedModel",
                   "inputs": {"model": ["q", 0], "save_name": "fastgen/test_teacher_fp8", "overwrite": True}}}
    _, entry = digits(comfy, object_info, nodes, ["q", 0])
    text = node_text(entry, "s")
    where = "models/unet/fastgen/test_teacher_fp8.safetensors"
    assert "saved fastgen/test_teacher_fp8.safetensors (" in text and f"as {where}" in text, text
    assert "the other weights in the dtype they came in (float16)" in text, text
    path = os.path.join(comfy.base, *where.split("/"))
    with safe_open(path, "pt") as f:
        kept = {k: f.get_slice(k).get_dtype() for k in f.keys()
                if not k.startswith((STATE_PREFIX, RANGE_PREFIX)) and not k.endswith(("weight_scale",))}
    quantized = {k for k, dtype in kept.items() if dtype not in ("F16", "F32")}
    assert len(quantized) == 24, quantized  # the fp8 weights
    assert {dtype for k, dtype in kept.items() if k not in quantized} == {"F16"}, kept
    original = os.path.getsize(os.path.join(ASSETS, "digit_teacher.safetensors"))
    assert os.path.getsize(path) < original, (os.path.getsize(path), original)


WAN_LATENT = {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}}


def wan_graph(model_nodes: dict, model_link):
    prompt = dict(model_nodes)
    prompt["m"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_wan.safetensors", "weight_dtype": "default"}}
    prompt["c"] = {"class_type": "FastGenTestConditioning", "inputs": {"seed": 0, "tokens": 8, "width": 4096}}
    prompt["lat"] = WAN_LATENT
    prompt["k"] = {"class_type": "KSampler", "inputs": {
        "model": model_link, "positive": ["c", 0], "negative": ["c", 0], "latent_image": ["lat", 0], "seed": 5, "steps": 4, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["out"] = {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "latents/quant_wan"}}
    return prompt


def test_quantized_tiny_wan_runs_through_ksampler_and_accepts_a_lora(comfy):
    plain, _ = run_latent(comfy, wan_graph({}, ["m", 0]))
    quantized, entry = run_latent(comfy, wan_graph({"q": quantize(["m", 0], "int8")}, ["q", 0]))
    text = node_text(entry, "q")
    assert "int8 on 20 of" in text, text  # 2 blocks x (self q k v o, cross q k v o, ffn.0, ffn.2)
    print(f"tiny Wan int8: {relative_error(quantized, plain):.4f} from unquantized")
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, plain) and relative_error(quantized, plain) < 0.05

    wan_lora = "tiny_wan_lora_comfy.safetensors"
    with_lora, _ = run_latent(comfy, wan_graph({"l": lora(["m", 0], wan_lora)}, ["l", 0]))
    quantized_lora, _ = run_latent(comfy, wan_graph({"q": quantize(["m", 0], "int8"), "l": lora(["q", 0], wan_lora)}, ["l", 0]))
    print(f"tiny Wan LoRA after int8: {relative_error(quantized_lora, quantized):.4f} from no LoRA, "
          f"{relative_error(quantized_lora, with_lora):.4f} from the unquantized LoRA output")
    assert relative_error(quantized_lora, quantized) > 0.05, "the LoRA after the quantize node changed nothing"
    assert relative_error(quantized_lora, with_lora) < 0.05


def test_a_lora_after_a_compact_loaded_model_changes_the_output(comfy, object_info):
    _, ids = digits_graph(object_info)
    save = {"q": quantize([ids["FastGenLoadModel"], 0], "int8"),
            "s": {"class_type": "FastGenSaveQuantizedModel",
                  "inputs": {"model": ["q", 0], "save_name": "fastgen/test_compact_lora", "overwrite": True}}}
    digits(comfy, object_info, save, ["q", 0])
    load = {"ld": {"class_type": "FastGenLoadQuantizedModel",
                   "inputs": {"model_name": "fastgen/test_compact_lora.safetensors", "compact": True}}}
    compact, _ = digits(comfy, object_info, load, ["ld", 0])
    with_lora, _ = digits(comfy, object_info, {**load, "l": lora(["ld", 0], strength=0.5)}, ["l", 0])
    reference, _ = digits(comfy, object_info, {"l": lora([ids["FastGenLoadModel"], 0], strength=0.5)}, ["l", 0])
    print(f"LoRA after a compact int8 model: {relative_error(with_lora, compact):.3f} from no LoRA, "
          f"{relative_error(with_lora, reference):.3f} from the unquantized LoRA output")
    assert relative_error(with_lora, compact) > 0.3


def test_int4_loads_compact_at_a_quarter_of_the_weights_and_takes_a_lora(comfy, object_info):
    _, ids = digits_graph(object_info)
    save = {"q": quantize([ids["FastGenLoadModel"], 0], "int4"),
            "s": {"class_type": "FastGenSaveQuantizedModel",
                  "inputs": {"model": ["q", 0], "save_name": "fastgen/test_digits_int4", "overwrite": True}}}
    in_graph, _ = digits(comfy, object_info, save, ["q", 0])
    load = {"ld": {"class_type": "FastGenLoadQuantizedModel",
                   "inputs": {"model_name": "fastgen/test_digits_int4.safetensors", "compact": True}}}
    compact, entry = digits(comfy, object_info, load, ["ld", 0])
    text = node_text(entry, "ld")
    # fp32 on the CPU host: 4 bytes a weight -> half a byte + a float32 scale per 128 weights
    assert "compact: 24 layers held as int4 codes" in text and "7.5x smaller" in text, text
    torch.testing.assert_close(compact, in_graph, rtol=0, atol=1e-5)
    with_lora, _ = digits(comfy, object_info, {**load, "l": lora(["ld", 0], strength=0.5)}, ["l", 0])
    reference, _ = digits(comfy, object_info, {"l": lora([ids["FastGenLoadModel"], 0], strength=0.5)}, ["l", 0])
    print(f"LoRA after a compact int4 model: {relative_error(with_lora, compact):.3f} from no LoRA, "
          f"{relative_error(with_lora, reference):.3f} from the unquantized LoRA output")
    assert relative_error(with_lora, compact) > 0.3
