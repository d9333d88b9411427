"""Graph passes for torch.compile (inductor's `pre_grad_custom_pass`).

`FuseLinearGelu`: a Linear followed by GELU's tanh approximation (a DiT's FFN: Wan's
`Linear -> GELU(approximate="tanh") -> Linear`) becomes one `torch._addmm_activation(..., use_gelu=True)`:
on CUDA, cuBLASLt applies the bias and the tanh-GELU in the GEMM's epilogue, so the wide hidden
activation is written once instead of written, read, and written again by a separate kernel
(Wan-1.3B at 480p: 55 ms of a 2.1 s video on an H200, benchmarks/RESULTS.md). Only on CUDA: the
CPU kernel of `_addmm_activation` applies the exact (erf) GELU, which would change the model's
numbers; there the pass leaves the graph alone. Inference only (compiled under no_grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh") as one GEMM with a GELU epilogue (CUDA)."""
    flat = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(bias, flat, weight.t(), use_gelu=True).reshape(*x.shape[:-1], weight.shape[0])


class FuseLinearGelu(CustomGraphPass):
    """Rewrites gelu(linear(x, w, b), approximate="tanh") into `linear_gelu(x, w, b)` where the
    tensors live on one of `devices` and the Linear's output feeds the GELU alone."""

    def __init__(self, devices: tuple[str, ...] = ("cuda",)):
        self.devices = tuple(devices)
        self.fused = 0  # rewrites made, over every graph this pass has seen

    def __call__(self, graph: torch.fx.Graph) -> None:
        if torch.is_grad_enabled():  # a graph for training: _addmm_activation has no derivative
            return
        for gelu in list(graph.nodes):
            if not (gelu.op == "call_function" and gelu.target is F.gelu and _approximation(gelu) == "tanh"):
                continue
            linear = gelu.args[0] if gelu.args else gelu.kwargs.get("input")
            if not (isinstance(linear, torch.fx.Node) and linear.op == "call_function" and linear.target is F.linear
                    and len(linear.users) == 1 and self._on_devices(linear)):
                continue
            x, weight, bias = (list(linear.args) + [linear.kwargs.get("bias")])[:3]
            if bias is None:
                continue
            with graph.inserting_before(gelu):
                fused = graph.call_function(linear_gelu, (x, weight, bias))
            fused.meta.update(gelu.meta)
            gelu.replace_all_uses_with(fused)
            graph.erase_node(gelu)
            graph.erase_node(linear)
            self.fused += 1

    def _on_devices(self, node: torch.fx.Node) -> bool:
        value = node.meta.get("example_value")
        return isinstance(value, torch.Tensor) and value.device.type in self.devices

    def uuid(self) -> str:
        """Inductor's cache key for graphs compiled with this pass."""
        return f"fastgen.FuseLinearGelu.v1:{','.join(self.devices)}"


def _approximation(node: torch.fx.Node) -> str:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("approximate", "none")
