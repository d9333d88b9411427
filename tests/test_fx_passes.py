"""FuseLinearGelu, the compiled causal loop's FFN fusion (on CUDA: cuBLASLt's GELU epilogue; the
H200 video figures are in benchmarks/RESULTS.md). On the CPU the rewrite itself is checked with the
pass told to take CPU graphs: `_addmm_activation`'s CPU kernel applies the exact GELU, which is why
the pass leaves CPU graphs alone by default."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgen_core.fx_passes import FuseLinearGelu


def ffn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(approximate="tanh"), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 4),
                         nn.GELU(approximate="tanh"))


@pytest.fixture(autouse=True)
def no_compile_caches():
    """Compile afresh: a graph inductor finds in its on-disk caches skips the pass (and its count)."""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def compiled(model, fuse):
    torch._dynamo.reset()
    return torch.compile(lambda x: model(x), options={"pre_grad_custom_pass": fuse})


def test_the_linear_tanh_gelu_pairs_become_one_gemm_with_a_gelu_epilogue():
    model, fuse = ffn(), FuseLinearGelu(devices=("cpu",))
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        out = compiled(model, fuse)(x)
        # what _addmm_activation computes on the CPU (exact GELU) for the two rewritten pairs; the
        # exact-GELU pair in the middle is left as it is
        expected = F.linear(x, model[0].weight, model[0].bias)
        expected = model[3](model[2](F.gelu(expected)))
        expected = F.gelu(F.linear(expected, model[4].weight, model[4].bias))
    assert fuse.fused == 2
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_cpu_graphs_and_training_graphs_are_left_alone():
    model, x = ffn(), torch.randn(3, 5, 8)
    by_default = FuseLinearGelu()  # CUDA only
    with torch.no_grad():
        out = compiled(model, by_default)(x)
        assert torch.allclose(out, model(x), atol=1e-6, rtol=0)
    assert by_default.fused == 0
    training = FuseLinearGelu(devices=("cpu",))
    out = compiled(model, training)(x)  # grad enabled: _addmm_activation has no derivative
    out.sum().backward()
    assert training.fused == 0 and model[0].weight.grad is not None
    assert by_default.uuid() != training.uuid()
