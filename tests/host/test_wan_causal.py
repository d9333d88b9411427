"""The causal adapter's compiled blocks (#7) against its eager blocks, on the host's own Wan 2.1
code in this process (no server): same outputs, one set of graphs for every block and cache length."""

import logging

import pytest
import torch
from comfy_host import import_host_in_process, load_repo_module


@pytest.fixture(scope="module")
def host_wan():
    """(WanModel, comfy.ops, wan_causal, world) with a tiny random Wan: 4 blocks, dim 64."""

    def wan():
        import comfy.ops
        from comfy.ldm.wan.model import WanModel

        return comfy, WanModel

    comfy, WanModel = import_host_in_process(wan)
    bench = load_repo_module("causal_video_bench", "benchmarks", "causal_video.py")
    wan_causal, _ = bench.load_host_modules()  # the adapter as a module of a stand-in package
    torch.manual_seed(0)
    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64, ffn_dim=128, freq_dim=32,
                     text_dim=32, out_dim=16, num_heads=2, num_layers=4, cross_attn_norm=True, device="cpu",
                     dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    bench.randomize(model)
    return model, wan_causal, bench.world


def causal_video(host_wan, compile: bool, chunks: int = 4):
    """Every forward's output over `chunks` chunks (2 steps + the context pass each) with a sink of
    1 frame and a window of 2, so the cache fills, evicts and the attention sees 4 key lengths."""
    model, wan_causal, world = host_wan
    run = wan_causal.WanCausalRun(model, world.KVCache(sink_frames=1, window_frames=2, token_dim=1), compile=compile)
    options = {"patches_replace": {"dit": {("double_block", i): wan_causal._block_patch(i) for i in range(len(model.blocks))}},
               "optimized_attention_override": wan_causal.causal_attention, wan_causal.RUN_KEY: run}
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(1, 8, 32, generator=gen)
    shape = (1, 16, 2, 4, 6)
    outs = []
    with torch.no_grad():
        for _ in range(chunks):
            x = torch.randn(shape, generator=gen)
            run.begin_chunk(shape, "cpu", torch.float32)
            for level in (900.0, 500.0):
                outs.append(model(x, torch.full((1,), level), context, transformer_options=options))
                x = x - 0.3 * outs[-1]
            run.begin_chunk(shape, "cpu", torch.float32, write=True)
            outs.append(model(x, torch.zeros(1), context, transformer_options=options))
            run.end_chunk(2)
    assert run.cache.evicted == 2 * chunks - 3
    return outs, run


def test_compiled_blocks_equal_eager_blocks_without_recompiling(host_wan):
    from torch._dynamo.utils import counters, guard_failures

    torch._dynamo.reset()
    eager, _ = causal_video(host_wan, compile=False)
    compiled, run = causal_video(host_wan, compile=True)
    if not run.compile:
        pytest.skip("torch.compile does not work in this environment (the run fell back to eager blocks)")
    assert max(float((a - b).abs().max()) for a, b in zip(eager, compiled, strict=True)) <= 1e-5
    # each recompile starts with a guard failure: none means the 4 blocks and every cache length share the graphs
    assert sum(map(len, guard_failures.values())) == 0
    traced = counters["frames"]["total"]
    again, _ = causal_video(host_wan, compile=True)
    assert counters["frames"]["total"] == traced, "a second video traced frames again"
    assert all(torch.equal(a, b) for a, b in zip(compiled, again, strict=True))


def test_a_failing_compile_falls_back_to_the_eager_blocks(host_wan, monkeypatch, caplog):
    _, wan_causal, _ = host_wan

    def broken(original_block, args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(wan_causal, "_compiled_block", lambda mode=None: broken)
    eager, _ = causal_video(host_wan, compile=False, chunks=2)
    with caplog.at_level(logging.WARNING, logger="fastgen"):
        fallen_back, run = causal_video(host_wan, compile=True, chunks=2)
    assert not run.compile
    assert "torch.compile of the Wan blocks failed (no compiler here); running them eagerly" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(eager, fallen_back, strict=True))


def test_quantized_layers_run_inside_the_compiled_blocks(host_wan):
    """fp8 / int8 layers (FastGen Quantize Model) in compiled blocks: with their compressed weights
    as buffers of the layers, the 40 quantized Linears of the 4 blocks run inside the blocks' graphs
    (as many graphs as unquantized, no recompile per block or layer), as the eager quantized blocks
    compute. int8's torch._int_mm runs on CPU: the GPU's real GEMM route, not fake-quant."""
    pytest.importorskip("modelopt.torch.quantization")
    from torch._dynamo.utils import counters, guard_failures

    from fastgen_core import quant

    model = host_wan[0]
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    plain, run = causal_video(host_wan, compile=True, chunks=2)
    if not run.compile:
        pytest.skip("torch.compile does not work in this environment (the run fell back to eager blocks)")
    plain_graphs = counters["stats"]["unique_graphs"] - graphs

    bank = quant.quantize_model(model, "int8")
    bank.route = "int8"  # what choose_route picks on an SM >= 8.0 GPU
    before = {name: (set(m.__dict__), dict(m._buffers)) for name, m in model.named_modules()}
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    with bank.installed(model):
        assert bank.compiled_layers == bank.quantized_count() == 40  # q, k, v, o of both attentions, ffn.0, ffn.2
        eager, _ = causal_video(host_wan, compile=False, chunks=2)
        compiled, run = causal_video(host_wan, compile=True, chunks=2)
    assert run.compile
    assert sum(map(len, guard_failures.values())) == 0  # each recompile starts with a guard failure
    assert counters["stats"]["unique_graphs"] - graphs == plain_graphs  # no graph break per quantized layer
    # measured: compiled vs eager 6e-8 relative, quantized vs unquantized 3.5e-5 (this tiny Wan's blocks move x little)
    error = max(float((a - b).norm() / b.norm()) for a, b in zip(compiled, eager, strict=True))
    quantization = max(float((a - b).norm() / b.norm()) for a, b in zip(eager, plain, strict=True))
    assert quantization > 1e-5 and error < quantization / 100, (error, quantization)
    assert {name: (set(m.__dict__), dict(m._buffers)) for name, m in model.named_modules()} == before  # restored exactly


def test_cuda_graphs_are_refused_for_wan_variants_whose_blocks_take_more(host_wan):
    """The graphed stack calls the blocks as the text-to-video WanModel's forward does; a model with
    image inputs (or another class) keeps its own block calls, and the graphs say why they are off."""
    model, wan_causal, world = host_wan
    from fastgen_core.graphs import ForwardGraphs

    plain = ForwardGraphs()
    wan_causal.WanCausalRun(model, world.KVCache(token_dim=1), graphs=plain)
    assert plain.enabled
    model.img_emb = torch.nn.Identity()
    try:
        refused = ForwardGraphs()
        wan_causal.WanCausalRun(model, world.KVCache(token_dim=1), graphs=refused)
    finally:
        model.img_emb = None
    assert not refused.enabled and refused.report().endswith("not WanModel with image inputs")
