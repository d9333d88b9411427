"""Whole forwards replayed as CUDA graphs: one graph per distinct call, so a 30-block transformer's
thousands of kernel launches become one replay.

    graphs = ForwardGraphs()
    out = graphs(key, lambda inputs: model(inputs["x"], inputs["t"]), {"x": x, "t": t})

A call is captured the second time its key is seen and replayed after that. The first call runs
eagerly so that everything a capture must not do happens outside it: cuDNN and cuBLAS build their
plans, inductor compiles, caches grow their buffers. Before a replay the new inputs are copied into
the captured ones; the output is cloned out of the graph's memory (the next replay overwrites it).

The key must name everything the forward reads besides `inputs`' values: a captured graph replays
the same kernels on the same addresses, so anything that moves (a buffer that grew, a cache length
that changed) must change the key. Python side effects of the forward (counters, dict entries) happen
at capture only; the caller restores what it needs after a replay.

A capture that fails (an operation that CUDA graphs cannot record: a host sync, a copy from pageable
memory, a lowvram weight stream) turns the graphs off for good and the forward runs eagerly, with the
reason kept in `failure`: eager is always correct, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

log = logging.getLogger("fastgen")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the tensors the graph reads: new values are copied in
    output: torch.Tensor  # where the graph writes its result


class ForwardGraphs:
    """CUDA graphs of one forward function, keyed by the caller. All graphs share one memory pool,
    which is safe because they are replayed one at a time, in the order the caller runs them."""

    device_type = "cuda"  # the inputs' device that graphs can record (the unit tests fake it on the CPU)

    def __init__(self):
        self.graphs: dict[Hashable, _Captured] = {}
        self.seen: set[Hashable] = set()
        self.pool = None
        self.failure: str | None = None
        self.captures = self.replays = self.eager_calls = 0
        self.check_next = False  # compare the next replay with an eager forward (`verify_next`)
        self.dropped: str | None = None  # why graphs kept from before were dropped

    @property
    def enabled(self) -> bool:
        return self.failure is None

    def __call__(self, key: Hashable, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """forward(inputs) -> a tensor; inputs: CUDA tensors whose values change between calls."""
        if self.failure is None and not all(t.device.type == self.device_type for t in inputs.values()):
            self.failure = "CUDA graphs need CUDA tensors (this forward runs on " + \
                f"{next(iter(inputs.values())).device.type})"
        if self.failure is not None:
            self.eager_calls += 1
            return forward(inputs)
        key = (key, tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in sorted(inputs.items())))
        captured = self.graphs.get(key)
        if captured is None:
            if key not in self.seen:  # first sight: eager, so plans, compiles and buffers exist before a capture
                self.seen.add(key)
                self.eager_calls += 1
                return forward(inputs)
            captured = self._capture(key, forward, inputs)
            if captured is None:
                self.eager_calls += 1
                return forward(inputs)
        for name, tensor in inputs.items():
            static = captured.inputs[name]
            if static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        captured.graph.replay()
        self.replays += 1
        output = captured.output.clone()
        return self._checked(output, forward, inputs) if self.check_next else output

    def verify_next(self):
        """Check the next replay against an eager forward of the same inputs; if they differ, drop
        every graph (they were captured over something that has changed since: weights moved,
        another patch) and capture afresh. For graphs kept from an earlier run."""
        self.check_next = bool(self.graphs)

    def _checked(self, replayed: torch.Tensor, forward, inputs) -> torch.Tensor:
        self.check_next = False
        self.eager_calls += 1
        eager = forward(inputs)
        difference = float((replayed.float() - eager.float()).abs().max())
        scale = float(eager.float().abs().max()) or 1.0
        if not difference <= 1e-3 * scale:  # (also NaN) replays repeat the eager kernels: equal in practice
            self.dropped = f"a kept graph's output differed from the eager forward's by {difference:.3g}: recaptured"
            log.warning("FastGen: %s", self.dropped)
            self.graphs.clear()
            self.seen.clear()
        return eager

    def _capture(self, key, forward, inputs) -> _Captured | None:
        static = {name: tensor.clone() for name, tensor in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # work queued on the current stream must finish before the capture stream records
            torch.cuda.current_stream().synchronize()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = forward(static)
        except Exception as err:  # noqa: BLE001 - anything CUDA graphs cannot record: eager is exact
            self.failure = f"capturing a CUDA graph failed ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
            log.warning("FastGen: %s; running the forwards eagerly", self.failure)
            self.graphs.clear()
            return None
        if not isinstance(output, torch.Tensor):
            self.failure = f"the forward returned {type(output).__name__}, not a tensor"
            return None
        self.captures += 1
        self.graphs[key] = _Captured(graph, static, output)
        return self.graphs[key]

    def report(self) -> str:
        if self.failure is not None:
            return f"CUDA graphs off: {self.failure}"
        text = f"CUDA graphs: {self.captures} captured, {self.replays} replays, {self.eager_calls} eager calls"
        return text + (f" ({self.dropped})" if self.dropped else "")

    def release(self):
        """Drop the graphs and their memory pool."""
        self.graphs.clear()
        self.seen.clear()
        self.pool = None
