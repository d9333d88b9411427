"""#5 quantization on modelopt, on the embedded teacher (CPU: fake-quant and the real GEMM code)."""

import gc
import os
import weakref

import pytest
import torch

from fastgen_core import checkpoint, quant
from fastgen_core import eval as metrics
from fastgen_core.networks import DigitDiT, DigitDiTConfig, class_conditioning, sample_digits

pytest.importorskip("modelopt.torch.quantization")

TEACHER = os.path.join(metrics.ASSETS, "digit_teacher.safetensors")
LABELS = torch.arange(40) % 10  # 4 of each digit
SAMPLING = dict(steps=4, guidance=3.0, seed=0, sampler="ab2")  # 100 % of these read as their digit


@pytest.fixture(scope="module")
def teacher():
    return checkpoint.load_network(TEACHER)[0]


@pytest.fixture(scope="module")
def reference(teacher):
    return sample_digits(teacher, LABELS, **SAMPLING)


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier()


def one_call(net, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        return net(x, torch.rand(4, generator=gen), class_conditioning([1, 2, 3, 10])[:, 0])


@pytest.mark.parametrize("fmt,min_psnr", [("fp8", 22.0), ("int8", 25.0)])
def test_fake_quant_keeps_the_teachers_digits(teacher, reference, classifier, fmt, min_psnr):
    """Measured at 100 digits, 8 ab2 steps: fp8 25.8 dB, int8 29.7 dB, accuracy 99 % as unquantized."""
    bank = quant.quantize_model(teacher, fmt)
    assert bank.quantized_count() == 24  # qkv, proj, fc1, fc2 in each of the 6 blocks
    with bank.installed(teacher):
        out = sample_digits(teacher, LABELS, **SAMPLING)
    psnr = metrics.psnr(out, reference)
    assert min_psnr <= psnr < 60, f"{fmt}: PSNR {psnr:.1f} dB (>= 60 would mean nothing was quantized)"
    accuracy = metrics.conditional_accuracy(classifier, out, LABELS)
    unquantized = metrics.conditional_accuracy(classifier, reference, LABELS)
    assert abs(accuracy - unquantized) <= 0.01 + 1e-6, (fmt, accuracy, unquantized)


def test_default_layers_keep_embeddings_modulation_and_the_head_in_high_precision(teacher):
    layers = quant.select_layers(teacher)
    assert len(layers) == 24 and all(name.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") for name in layers)
    kept = set(quant.linear_layers(teacher)) - set(layers)
    assert {"patch_embed", "time_mlp1", "time_mlp2", "class_embed", "final_ada", "final_proj", "blocks.0.ada"} <= kept
    assert quant.select_layers(teacher, "blocks.*.fc1, blocks.0.qkv") == ["blocks.0.qkv"] + [f"blocks.{i}.fc1" for i in range(6)]


def test_a_pattern_matching_nothing_is_an_error(teacher):
    with pytest.raises(ValueError, match=r"'blocks\.\*\.mlp' matches no Linear layer.*named like patch_embed"):
        quant.select_layers(teacher, "blocks.*.fc1, blocks.*.mlp")


def test_nvfp4_on_cpu_names_the_gpu_it_needs(teacher):
    with pytest.raises(ValueError, match="nvfp4 needs an NVIDIA Blackwell GPU .*compute capability 10.0.*runs on CPU"):
        quant.quantize_model(teacher, "nvfp4")


def test_linear_subclasses_are_registered_and_quantized():
    """The host builds models from its comfy.ops Linear subclasses; modelopt skips those unless
    registered. A stand-in subclass with the host's switch attributes goes the same way."""

    class HostLinear(torch.nn.Linear):
        comfy_cast_weights = False
        weight_function = []
        bias_function = []

    class Ops:
        Linear = HostLinear
        LayerNorm = torch.nn.LayerNorm

    torch.manual_seed(0)
    net = DigitDiT(DigitDiTConfig(dim=32, depth=2, heads=2), operations=Ops).eval()
    before = one_call(net)
    bank = quant.quantize_model(net, "int8")
    assert bank.quantized_count() == 8
    assert all(isinstance(s, HostLinear) and type(s) is not HostLinear for s in bank.shadows.values())
    with bank.installed(net):
        during = one_call(net)
    assert not torch.equal(during, before) and torch.allclose(during, before, atol=0.05)
    assert all(type(m) is HostLinear and "forward" not in vars(m) for m in net.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(one_call(net), before, rtol=0, atol=0)  # untouched outside the block


def test_weights_changed_after_quantization_are_used_with_their_own_range():
    """What keeps a LoRA applied after the node working: the quantizers see the current weight
    and scale it by its own range (a stale range would clip a 3x larger weight to a third)."""
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "int8")
    x = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(0))
    layer = net.blocks[0].fc1
    with torch.no_grad():
        base = bank.linear("blocks.0.fc1", x, layer.weight, layer.bias)
        layer.weight.mul_(3.0)
        patched = bank.linear("blocks.0.fc1", x, layer.weight, layer.bias)
        exact = layer(x)
    assert relative_error(patched, exact) < 0.02
    assert relative_error(patched, base) > 0.5
    with bank.installed(net):
        whole = one_call(net)
    assert relative_error(whole, one_call(net)) < 0.08


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def calibrated_bank(net, fmt, seed):
    """Quantizers for the teacher's default layers, calibrated on one model call."""
    bank = quant.LayerQuantizers(net, fmt, quant.select_layers(net))

    def calibration():
        with bank.installed(net):
            one_call(net, seed=seed)

    bank.calibrate(calibration)
    return bank


def test_smoothquant_calibration_never_writes_the_models_weights():
    net = checkpoint.load_network(TEACHER)[0]
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="needs a calibration run"):
        quant.quantize_model(net, "int8_smoothquant")
    bank = calibrated_bank(net, "int8_smoothquant", seed=2)
    assert bank.calibrated and all(s.input_quantizer.pre_quant_scale is not None for s in bank.shadows.values())
    for key, value in net.state_dict().items():
        assert torch.equal(value, weights[key]), f"calibration changed {key}"
    with bank.installed(net):
        smooth = one_call(net)
    assert relative_error(smooth, one_call(net)) < 0.1  # measured 0.07 (calibrated on one other batch)
    bank.route = "int8"  # the int8 GEMM with the smoothing scales and the calibrated input range
    with bank.installed(net):
        assert relative_error(one_call(net), smooth) < 0.05


@pytest.mark.parametrize("route", ["fp8", "int8"])
def test_real_gemm_routes_agree_with_fake_quant(route):
    """torch._scaled_mm / torch._int_mm run on CPU too: the GPU code path, checked here."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=gen).bfloat16()
    w = (torch.randn(96, 128, generator=gen) * 0.05).bfloat16()
    bias = torch.randn(96, generator=gen).bfloat16()
    exact = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    w_q, w_scale = quant.compress_weight(w, route)
    assert w_q.dtype == quant.CODE_DTYPES[route]
    linear = quant.fp8_linear if route == "fp8" else quant.int8_linear
    out = linear(x, w_q, w_scale.reshape(-1), bias)
    assert out.dtype == torch.bfloat16 and (out.float() - exact).norm() / exact.norm() < 3e-2


def test_real_route_follows_weight_changes(teacher):
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "int8")
    bank.route = "int8"  # what choose_route picks on an SM >= 8.0 GPU
    with bank.installed(net):
        first = one_call(net)
    with torch.no_grad():
        net.blocks[0].fc1.weight.mul_(2.0)
    with bank.installed(net):
        second = one_call(net)
    exact = one_call(net)
    assert (second - exact).norm() / exact.norm() < 0.05 and not torch.allclose(first, second)


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
def test_save_then_load_gives_identical_outputs(tmp_path, fmt):
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, fmt)
    with bank.installed(net):
        saved_output = one_call(net)
    path = str(tmp_path / f"digits_{fmt}.safetensors")
    quant.save_quantized(path, net.state_dict(), bank, metadata={"note": "test"})
    assert os.path.getsize(path) < 0.6 * os.path.getsize(TEACHER) * 2  # fp32 weights in memory, 1 byte or less on disk

    tensors, info, state, metadata = quant.load_quantized(path)
    assert info["format"] == fmt and metadata["note"] == "test" and "modelopt_state" in metadata
    loaded = DigitDiT(net.config).eval()
    loaded.load_state_dict(tensors)
    restored = quant.restore_quantizers(loaded, info, state)
    with restored.installed(loaded):
        reloaded_output = one_call(loaded)
    assert_same_quantized_output(reloaded_output, saved_output, fmt)

    if fmt in ("fp8", "int8", "int4"):  # held as codes (FastGen Load Quantized Model's default): bit-identical
        compact = DigitDiT(net.config).eval()
        compact.load_state_dict(tensors)
        compact_bank = quant.restore_quantizers(compact, info, state)
        assert quant.compact_layers(compact, compact_bank, info["weight_ranges"]) == compact_bank.layers
        with compact_bank.installed(compact):
            torch.testing.assert_close(one_call(compact), saved_output, rtol=0, atol=0)


def assert_same_quantized_output(actual, expected, fmt):
    """int8 / int4: bit-identical. fp8: modelopt's fp8 fake-quant is not bit-idempotent (quantizing
    an already quantized weight can move its range by one float ulp), and 3-bit-mantissa rounding
    of the activations downstream amplifies that: measured 1.1 % relative (fp8 itself is ~3 %)."""
    if fmt == "fp8":
        assert relative_error(actual, expected) < 0.03
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_calibrated_ranges_survive_save_and_load(tmp_path):
    net = checkpoint.load_network(TEACHER)[0]
    bank = calibrated_bank(net, "fp8", seed=3)
    assert all(s.input_quantizer.amax is not None for s in bank.shadows.values())
    with bank.installed(net):
        expected = one_call(net)
    path = str(tmp_path / "calibrated.safetensors")
    quant.save_quantized(path, net.state_dict(), bank)
    tensors, info, state, _ = quant.load_quantized(path)
    assert info["calibrated"] and info["algorithm"] == "max"
    loaded = DigitDiT(net.config).eval()
    loaded.load_state_dict(tensors)
    restored = quant.restore_quantizers(loaded, info, state)
    assert restored.calibrated
    with restored.installed(loaded):
        assert_same_quantized_output(one_call(loaded), expected, "fp8")


def test_the_core_imports_without_modelopt_and_says_what_to_install(monkeypatch):
    import subprocess
    import sys

    code = "import sys, fastgen_core.quant; assert not any(m.startswith('modelopt') for m in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__))).returncode == 0
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install nvidia-modelopt"):
        quant.quantize_model(checkpoint.load_network(TEACHER)[0], "int8")


def test_a_failing_gemm_falls_back_to_fake_quant(monkeypatch):
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "fp8")
    with bank.installed(net):
        fake = one_call(net)

    def no_kernel(*args, **kwargs):
        raise RuntimeError("_scaled_mm is not supported on this device")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    bank.route = "fp8"
    with bank.installed(net):
        out = one_call(net)
    assert bank.route == "fake" and "not supported" in bank.fallback
    torch.testing.assert_close(out, fake, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_compact_layers_hold_8_bit_codes_and_take_the_hosts_weight_patches(fmt):
    """A loaded quantized model can keep its layers as codes (half of bf16) and dequantize them on
    the fly; the host patches LoRAs into such layers through convert_weight / set_weight."""
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, fmt)
    with bank.installed(net):
        expected = one_call(net)
    fc1 = net.blocks[0].fc1
    original = fc1.weight.detach().clone()
    weakly_held = weakref.ref(fc1.weight)
    assert quant.compact_layers(net, bank) == bank.layers
    gc.collect()
    assert weakly_held() is None, "something still holds the full-precision weight"
    assert {net.get_submodule(name).weight.dtype for name in bank.layers} == {quant.CODE_DTYPES[fmt]}
    with bank.installed(net):
        compact = one_call(net)
    torch.testing.assert_close(compact, expected, rtol=0, atol=0)
    bank.route = fmt  # what a GPU with the kernel runs: the GEMM straight on the stored codes

    def no_values(*args):
        pytest.fail("the real route asked for a compact layer's weight as values")

    with bank.installed(net, weights=no_values):
        real = one_call(net)
    assert relative_error(real, expected) < 0.05 and bank.cached_bytes() == 0  # no second copy of the weights

    values = fc1.convert_weight(fc1.weight.float())  # the host: codes -> values, add the patch, set
    assert relative_error(values, original) < 0.05
    fc1.set_weight(values * 0.5)
    assert fc1.weight.dtype == quant.CODE_DTYPES[fmt]
    assert relative_error(quant.dequantized(fc1, fc1.weight, torch.float32), values * 0.5) < 0.05


def test_awq_calibration_keeps_the_weights_and_round_trips_through_a_file(tmp_path):
    net = checkpoint.load_network(TEACHER)[0]
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    bank = calibrated_bank(net, "int4_awq", seed=2)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    assert all(s.weight_quantizer.pre_quant_scale is not None for s in bank.shadows.values())
    with bank.installed(net):
        awq = one_call(net)
    plain = quant.quantize_model(net, "int4")
    with plain.installed(net):
        int4 = one_call(net)
    exact = one_call(net)
    assert relative_error(awq, exact) < relative_error(int4, exact) + 0.005  # measured 0.070 vs 0.073

    path = str(tmp_path / "awq.safetensors")
    quant.save_quantized(path, net.state_dict(), bank)
    tensors, info, state, _ = quant.load_quantized(path)
    loaded = DigitDiT(net.config).eval()
    loaded.load_state_dict(tensors)
    restored = quant.restore_quantizers(loaded, info, state)
    with restored.installed(loaded):
        assert relative_error(one_call(loaded), awq) < 1e-5  # measured 3e-7 (weights stored scaled, divided back)


def test_a_compact_model_can_be_quantized_again_in_another_format():
    net = checkpoint.load_network(TEACHER)[0]
    fp8_on_original = quant.quantize_model(net, "fp8")
    with fp8_on_original.installed(net):
        expected = one_call(net)
    quant.compact_layers(net, quant.quantize_model(net, "int8"))
    again = quant.quantize_model(net, "fp8")
    assert again.quantized_count() == 24
    with again.installed(net):
        out = one_call(net)
    assert relative_error(out, expected) < 0.05  # fp8 of int8-rounded weights vs fp8 of the originals
    assert all(net.get_submodule(n).weight.dtype == torch.int8 for n in again.layers)  # still compact


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_activation_codes_are_modelopts_and_compile_as_one_graph(fmt):
    """The real routes' activation cast is modelopt's QTensor code written so that torch.compile
    fuses it on CUDA: same codes as modelopt's quantize in eager, one graph with no breaks (a
    break would bring back the separate passes), calibrated ranges saturate without a host sync."""
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor
    from modelopt.torch.quantization.utils import reduce_amax

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).bfloat16() * 3
    qmax, qtensor = (448.0, FP8QTensor) if fmt == "fp8" else (127.0, INT8QTensor)
    codes, scale = quant.activation_codes(x, None, fmt)
    expected_codes, expected_scale = qtensor.quantize(x, scales=reduce_amax(x).float() / qmax)
    assert torch.equal(codes.float(), expected_codes._quantized_data.float()) and torch.equal(scale, expected_scale)

    calibrated = torch.tensor([1.0, 2.0])  # a per-channel calibrated range: its max, per tensor
    codes, scale = quant.activation_codes(x, calibrated, fmt)
    assert scale.item() == pytest.approx(2.0 / qmax) and codes.float().abs().max().item() == pytest.approx(qmax)

    for amax in (None, calibrated):
        explained = torch._dynamo.explain(quant.activation_codes)(x, amax, fmt)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_fused_kernels_fall_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(8, 16)
    assert quant.fused(quant.activation_codes, x) is quant.activation_codes  # CPU: eager, nothing compiled
    fused = quant.CompiledOrEager(quant.activation_codes)
    with caplog.at_level("WARNING", logger="fastgen"):
        codes, scale = fused(x, None, "int8")
        again, _ = fused(x, None, "int8")
    assert torch.equal(codes, quant.activation_codes(x, None, "int8")[0]) and torch.equal(codes, again)
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1


def test_int4_layers_are_held_as_packed_codes_at_a_quarter_of_bf16():
    """int4 weight-only layers compact: modelopt's packed blockwise codes (two a byte) + block
    scales, dequantized per call to exactly the values the int4 quantizers gave; the host's LoRA
    hooks unpack and repack them at the stored scales."""
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "int4")
    with bank.installed(net):
        expected = one_call(net)
    fc1 = net.blocks[0].fc1
    original = fc1.weight.detach().clone()
    bf16_bytes = sum(net.get_submodule(n).weight.numel() * 2 for n in bank.layers)
    assert quant.compact_layers(net, bank) == bank.layers
    modules = [net.get_submodule(n) for n in bank.layers]
    assert {m.weight.dtype for m in modules} == {torch.uint8} and fc1.weight.shape == (512, 64)
    held = sum(m.weight.nbytes + m.weight_scale.nbytes for m in modules)
    assert held < bf16_bytes / 3.5  # 0.5 byte a weight + a float32 scale per 128
    with bank.installed(net):
        torch.testing.assert_close(one_call(net), expected, rtol=0, atol=0)

    values = fc1.convert_weight(fc1.weight.float())  # the host: codes (cast to float) -> values
    assert values.shape == original.shape and relative_error(values, original) < 0.15
    torch.testing.assert_close(quant.dequantized(fc1, fc1.weight.bfloat16(), torch.float32), values, rtol=0, atol=0)
    fc1.set_weight(values)  # repacking unchanged values at the stored scales is exact
    torch.testing.assert_close(quant.dequantized(fc1, fc1.weight, torch.float32), values, rtol=0, atol=0)
    fc1.set_weight(values * 3.0)  # beyond the stored range: saturates at the block's largest code
    assert fc1.weight.dtype == torch.uint8
    assert quant.dequantized(fc1, fc1.weight, torch.float32).abs().max() <= values.abs().max() * 8 / 7 + 1e-6


@pytest.mark.parametrize("route", ["int8", "fp8"])
def test_real_gemm_layers_compile_into_the_models_graph(route):
    """On the real GEMM routes the installed layers share one forward whose per-layer data are
    buffers (the compressed weight, made when installing): torch.compile traces the whole teacher
    as one graph, quantized GEMMs included, and each layer computes what its eager forward does.
    Leaving the block puts every module back as it was."""
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, route)
    bank.route = route  # torch._scaled_mm / torch._int_mm run on CPU: the GPU's code
    before = module_state(net)
    layer, x = net.blocks[0].fc1, torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with torch.no_grad(), bank.installed(net):
        assert bank.compiled_layers == 24
        eager, eager_layer = one_call(net), layer(x)
        gen = torch.Generator().manual_seed(1)
        inputs = (torch.randn(4, 3, 32, 32, generator=gen), torch.rand(4, generator=gen), class_conditioning([1, 2, 3, 10])[:, 0])
        explained = torch._dynamo.explain(net)(*inputs)
        compiled, compiled_layer = one_call(torch.compile(net)), torch.compile(layer)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert relative_error(compiled_layer, eager_layer) < 1e-5
    # the whole model: float rounding of the compiled graph moves a few activation codes, which
    # a quantized network amplifies (an input changed by 1e-7 moves this one's output by 2e-3)
    exact = one_call(net)
    assert relative_error(compiled, exact) < 1.5 * relative_error(eager, exact) and relative_error(compiled, eager) < 0.02
    assert module_state(net) == before


def test_a_weights_function_that_fails_on_the_probe_leaves_the_layers_eager():
    """Installing asks each layer's weights for a zero-row probe input to prepare the compiled forward;
    a weights function that cannot take it (a host cast with its own ideas) must cost only that
    forward: the layers run eagerly with the same output."""
    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "int8")
    bank.route = "int8"

    def picky(module, x):
        if x.shape[0] == 0:
            raise RuntimeError("no empty inputs here")
        return module.weight, module.bias, (id(module.weight), module.weight._version)

    with torch.no_grad():
        with bank.installed(net):
            expected = one_call(net)
        with bank.installed(net, weights=picky):
            assert bank.compiled_layers == 0
            assert torch.equal(one_call(net), expected)


def module_state(net):
    """What `installed` changes on the modules (their instance attributes, buffers), less the mark
    torch.compile leaves on a compiled module."""
    return {name: (set(m.__dict__) - {"_is_torch_compile"}, dict(m._buffers), set(m._non_persistent_buffers_set))
            for name, m in net.named_modules()}


def test_layers_without_a_compiled_forward_break_the_graph_without_recompiling():
    """Fake-quant (and compact, uncached) layers stay eager inside a compiled model: a graph break
    per layer through one shared function, so no guard on a per-layer object."""
    from torch._dynamo.utils import guard_failures

    net = checkpoint.load_network(TEACHER)[0]
    bank = quant.quantize_model(net, "int8")
    torch._dynamo.reset()
    with torch.no_grad(), bank.installed(net):
        assert bank.compiled_layers == 0
        eager = one_call(net)
        compiled = one_call(torch.compile(net))
    assert sum(map(len, guard_failures.values())) == 0
    assert relative_error(compiled, eager) < 0.02


@pytest.mark.parametrize("tamper,reason", [
    (lambda spec: spec.update(dtype="Tensor"), "dtype 'Tensor' is not one of"),
    (lambda spec: spec.update(shape=[200000, 200000]), "does not fit its stored"),
    (lambda spec: spec.update(shape=[-1, 4]), "not a list of positive sizes"),
    (lambda spec: spec.update(shape=[7, 3]), "does not fit its stored"),  # modelopt would silently truncate
])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_an_edited_quant_header_is_refused_naming_the_file_and_layer(tmp_path, tamper, reason, fmt):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    net = checkpoint.load_network(TEACHER)[0]
    path = str(tmp_path / "q.safetensors")
    quant.save_quantized(path, net.state_dict(), quant.quantize_model(net, fmt))
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(metadata[quant.QUANT_KEY])
    layer = sorted(info["weights"])[0]
    tamper(info["weights"][layer])
    metadata[quant.QUANT_KEY] = json.dumps(info)
    edited = str(tmp_path / "edited.safetensors")
    save_file(tensors, edited, metadata=metadata)
    with pytest.raises(ValueError, match=reason) as err:
        quant.load_quantized(edited)
    assert "edited.safetensors" in str(err.value)


@pytest.mark.parametrize("edit,reason", [
    ("nan", "is not all finite numbers"),
    ("stray", "belongs to no quantized layer of the header"),
    ("huge", "more than"),
])
def test_edited_saved_ranges_are_refused_naming_the_file(tmp_path, edit, reason):
    """The quantizers divide by the saved ranges: a NaN one would turn every output NaN without
    an error, so ranges and scales are checked when the file is read."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    net = checkpoint.load_network(TEACHER)[0]
    path = str(tmp_path / "q.safetensors")
    quant.save_quantized(path, net.state_dict(), quant.quantize_model(net, "int8"))
    with safe_open(path, "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    ranged = sorted(k for k in tensors if k.startswith(quant.RANGE_PREFIX))[0]
    if edit == "nan":
        tensors[ranged] = torch.full_like(tensors[ranged], float("nan"))
    elif edit == "stray":
        tensors[quant.STATE_PREFIX + "nowhere.weight_quantizer._amax"] = torch.ones(1)
    else:
        tensors[ranged] = torch.ones(10**6)
    edited = str(tmp_path / "edited.safetensors")
    save_file(tensors, edited, metadata=metadata)
    with pytest.raises(ValueError, match=reason) as err:
        quant.load_quantized(edited)
    assert "edited.safetensors" in str(err.value)
