import torch

from fastgen_core.data import from_model_space, load_mnist, to_model_space


def test_split_is_fixed_disjoint_and_balanced():
    train, held = load_mnist("train"), load_mnist("heldout")
    assert train.images.shape == (4500, 1, 28, 28) and held.images.shape == (500, 1, 28, 28)
    assert torch.equal(torch.bincount(held.labels), torch.full((10,), 50))
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    # disjoint: no held-out image equals a training image
    train_keys = {bytes(img.numpy().tobytes()) for img in train.images}
    assert not any(bytes(img.numpy().tobytes()) in train_keys for img in held.images)
    again = load_mnist("heldout")
    assert torch.equal(again.images, held.images) and torch.equal(again.labels, held.labels)


def test_model_space_round_trip():
    held = load_mnist("heldout")
    x = to_model_space(held.images[:8])
    assert x.shape == (8, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(from_model_space(x), held.images[:8])


def test_unknown_split_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="split must be"):
        load_mnist("test")
