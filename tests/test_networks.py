import pytest
import torch

from fastgen_core.networks import (
    NULL_CLASS,
    DigitDiT,
    DigitDiTConfig,
    class_conditioning,
    guided_denoiser,
    sample_digits,
)
from fastgen_core.train import flow_matching_loss

TINY = DigitDiTConfig(dim=32, depth=2, heads=2)


def tiny_net(seed=0):
    return DigitDiT(TINY).init_weights(seed)


def test_forward_shapes_and_any_multiple_of_the_patch():
    net = tiny_net()
    for h, w in [(32, 32), (16, 48)]:
        x = torch.randn(3, 3, h, w)
        assert net(x, torch.rand(3), class_conditioning([1, 2, NULL_CLASS])[:, 0]).shape == x.shape


def test_class_conditioning_is_one_hot_and_rejects_out_of_range():
    c = class_conditioning([0, 9, NULL_CLASS])
    assert c.shape == (3, 1, 11) and torch.equal(c.sum(-1), torch.ones(3, 1))
    for bad in (-1, 11, 42):
        with pytest.raises(ValueError, match=f"digit class {bad} is out of range"):
            class_conditioning([bad])


def test_forward_rejects_wrong_conditioning_and_image_shapes():
    net = tiny_net()
    with pytest.raises(ValueError, match="class weights"):
        net(torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 77))
    with pytest.raises(ValueError, match="expects"):
        net(torch.randn(1, 4, 32, 32), torch.rand(1), class_conditioning([1])[:, 0])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        net(torch.randn(1, 3, 30, 30), torch.rand(1), class_conditioning([1])[:, 0])


def test_denoiser_follows_the_flow_convention():
    """x0 = x - sigma * v: with v forced to (noise - x0) the denoiser recovers x0 exactly."""
    x0, noise, sigma = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor(0.7)

    class Oracle(torch.nn.Module):  # the exact velocity, for the conditional and unconditional halves alike
        def forward(self, x, s, c):
            return (noise - x0).repeat(x.shape[0] // 2, 1, 1, 1)

    x = sigma * noise + (1 - sigma) * x0
    denoised = guided_denoiser(Oracle(), class_conditioning([1, 2])[:, 0], guidance=3.0)(x, sigma)
    torch.testing.assert_close(denoised, x0)


def test_guidance_one_is_the_conditional_prediction():
    net = tiny_net()
    with torch.no_grad():
        for block in net.blocks:  # non-zero gates so class and blocks matter
            block.ada.weight.normal_(0, 0.1)
        net.final_ada.weight.normal_(0, 0.1)
        net.final_proj.weight.normal_(0, 0.1)
    cond = class_conditioning([3, 4])[:, 0]
    x, s = torch.randn(2, 3, 32, 32), torch.tensor(0.5)
    expected = x - s * net(x, s.expand(2), cond)
    torch.testing.assert_close(guided_denoiser(net, cond, 1.0)(x, s), expected)
    assert not torch.allclose(guided_denoiser(net, cond, 3.0)(x, s), expected)


def test_sampling_is_deterministic_for_a_seed():
    net = tiny_net()
    a = sample_digits(net, [1, 2, 3], steps=3, guidance=2.0, seed=5)
    b = sample_digits(net, [1, 2, 3], steps=3, guidance=2.0, seed=5)
    c = sample_digits(net, [1, 2, 3], steps=3, guidance=2.0, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    net = tiny_net()
    from fastgen_core.data import load_mnist, to_model_space

    held = load_mnist("heldout")
    x0, labels = to_model_space(held.images[:16]), held.labels[:16]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)

    def loss_at(seed):
        return flow_matching_loss(net, x0, labels, torch.Generator().manual_seed(seed))

    with torch.no_grad():
        before = sum(loss_at(s).item() for s in range(4))
    for step in range(30):
        loss = loss_at(100 + step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(s).item() for s in range(4))
    assert after < 0.7 * before, (before, after)
