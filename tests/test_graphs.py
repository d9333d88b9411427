"""fastgen_core.graphs' bookkeeping on the CPU, with torch.cuda's graph calls faked: which call runs
eagerly, which captures, which replays, and what a failed capture leaves. (The real replays are
checked on a GPU: benchmarks/causal_video.py --variants compile+chunkgraphs+tiny --verify gives the
video bit for bit, RESULTS.md.)"""

import contextlib

import pytest
import torch

from fastgen_core.graphs import ForwardGraphs


class FakeGraph:
    """Records nothing: the capture runs the forward for real, a replay leaves its output as is."""

    def __init__(self):
        self.replayed = 0

    def replay(self):
        self.replayed += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    captures = []

    @contextlib.contextmanager
    def graph(g, pool=None, capture_error_mode="global"):
        captures.append((g, pool, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"synchronize": lambda self: None})())
    monkeypatch.setattr(ForwardGraphs, "device_type", "cpu")
    return captures


def test_first_call_eager_second_captures_then_replays_with_the_new_inputs(fake_cuda):
    graphs, calls = ForwardGraphs(), []

    def forward(inputs):
        calls.append(inputs["x"])
        return inputs["x"] * 2

    x1, x2, x3 = (torch.full((2, 3), float(v)) for v in (1, 2, 3))
    assert torch.equal(graphs("k", forward, {"x": x1}), x1 * 2)  # eager
    assert calls[-1] is x1 and not graphs.graphs
    out = graphs("k", forward, {"x": x2})  # captured over a copy of x2 (the fake runs it), then replayed
    assert torch.equal(out, x2 * 2) and calls[-1] is not x2 and torch.equal(calls[-1], x2)
    assert len(fake_cuda) == 1 and fake_cuda[0][1:] == ("pool", "thread_local")
    graphs("k", forward, {"x": x3})  # replay: no Python ran, the new values went into the graph's input
    assert len(calls) == 2
    (captured,) = graphs.graphs.values()
    assert torch.equal(captured.inputs["x"], x3) and captured.graph.replayed == 2
    assert (graphs.captures, graphs.replays, graphs.eager_calls) == (1, 2, 1)
    out.add_(100)  # what a replay returns is the caller's: the graph's own output is untouched
    assert torch.equal(captured.output, x2 * 2)
    assert graphs.report() == "CUDA graphs: 1 captured, 2 replays, 1 eager calls"


def test_a_new_key_or_shape_is_eager_first_and_gets_its_own_graph(fake_cuda):
    graphs = ForwardGraphs()
    forward = lambda inputs: inputs["x"] + 1  # noqa: E731
    for key, shape in (("a", 2), ("a", 2), ("b", 2), ("a", 3), ("b", 2), ("a", 3)):
        graphs(key, forward, {"x": torch.zeros(shape)})
    assert graphs.captures == 3 and graphs.eager_calls == 3 and graphs.replays == 3
    assert len(graphs.graphs) == 3


def test_a_failed_capture_runs_eagerly_and_turns_the_graphs_off(fake_cuda, monkeypatch, caplog):
    graphs = ForwardGraphs()

    @contextlib.contextmanager
    def refusing(g, pool=None, capture_error_mode="global"):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", refusing)
    forward = lambda inputs: inputs["x"] * 3  # noqa: E731
    x = torch.ones(2)
    graphs("k", forward, {"x": x})
    with caplog.at_level("WARNING", logger="fastgen"):
        out = graphs("k", forward, {"x": x * 2})
    assert torch.equal(out, x * 6) and not graphs.enabled and not graphs.graphs
    assert "operation not permitted" in graphs.failure and "running the forwards eagerly" in caplog.text
    assert torch.equal(graphs("k", forward, {"x": x}), x * 3) and graphs.captures == 0
    assert graphs.report().startswith("CUDA graphs off: capturing a CUDA graph failed")


def test_cpu_inputs_turn_the_graphs_off_with_the_reason():
    graphs = ForwardGraphs()
    assert torch.equal(graphs("k", lambda inputs: inputs["x"] - 1, {"x": torch.ones(3)}), torch.zeros(3))
    assert graphs.report() == "CUDA graphs off: CUDA graphs need CUDA tensors (this forward runs on cpu)"


def test_the_cache_layout_names_its_length_and_buffers_and_survives_a_reset_that_keeps_them():
    from fastgen_core.world import KVCache

    cache = KVCache(token_dim=1)
    k = torch.randn(1, 4, 8)
    keys, _ = cache.attend(0, k, k)
    cache.append([cache.slots(0, 4)], frames=2)  # the slots attend wrote: appended without a copy
    assert torch.equal(cache.layers[0][0], k)
    layout = cache.layout()
    assert layout[0] == 4 and len(layout[1]) == 2
    cache.reset(keep_buffers=True)
    assert cache.tokens == 0 and cache.layout()[1] == layout[1]
    cache.reset()
    assert cache.layout() == (0, ())


def test_a_kept_graph_is_checked_once_against_eager_and_recaptured_when_stale(fake_cuda):
    graphs, scale = ForwardGraphs(), {"w": 2.0}
    forward = lambda inputs: inputs["x"] * scale["w"]  # noqa: E731
    x = torch.ones(3)
    for _ in range(3):  # eager, capture, replay
        graphs("k", forward, {"x": x})
    graphs.verify_next()
    assert torch.equal(graphs("k", forward, {"x": x}), x * 2) and graphs.graphs and graphs.dropped is None
    assert not graphs.check_next  # checked once, then plain replays
    scale["w"] = 5.0  # what the graph was captured over has changed (the fake graph keeps the old output)
    graphs.verify_next()
    assert torch.equal(graphs("k", forward, {"x": x}), x * 5), "the stale replay was returned"
    assert not graphs.graphs and "recaptured" in graphs.dropped and "recaptured" in graphs.report()
    graphs("k", forward, {"x": x})  # first sight again: eager, then capture
    assert torch.equal(graphs("k", forward, {"x": x}), x * 5) and graphs.captures == 2
