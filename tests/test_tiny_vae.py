"""The tiny video decoder (TAEHV layout): the published files' key layout loads, the frame count
matches the Wan VAE's, streaming chunk by chunk equals one decode of the whole latent, and files
that do not fit say why."""

import pytest
import torch
from safetensors.torch import save_file

from fastgen_core import tiny_vae
from fastgen_core.tiny_vae import TinyVaeError, TinyVideoDecoder

# Keys and shapes of the published taew2_1 decoder (madebyollin/taehv, base variant, 16 latent
# channels): checked against the reference implementation's state dict, one per kind of layer.
PUBLISHED_LAYOUT = {
    "decoder.1.weight": (256, 16, 3, 3),  # latents -> 256
    "decoder.3.conv.0.weight": (256, 512, 3, 3),  # memory block: [frame, previous frame]
    "decoder.7.conv.weight": (256, 256, 1, 1),  # no temporal growth in the first stage
    "decoder.8.weight": (128, 256, 3, 3),
    "decoder.13.conv.weight": (256, 128, 1, 1),  # 2x frames
    "decoder.19.conv.weight": (128, 64, 1, 1),  # 2x frames
    "decoder.22.weight": (3, 64, 3, 3),  # -> RGB
    "decoder.22.bias": (3,),
}


def random_state_dict(latent_channels=16, patch_size=1, seed=0, std=0.05, grow_everywhere=False):
    model = TinyVideoDecoder(latent_channels, patch_size)
    gen = torch.Generator().manual_seed(seed)
    state = {f"decoder.{k}": torch.randn(v.shape, generator=gen) * std for k, v in model.decoder.state_dict().items()}
    if grow_everywhere:  # a file trained with temporal growth in the first stage too
        state["decoder.7.conv.weight"] = torch.randn(512, 256, 1, 1, generator=gen) * std
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3)  # the files carry the encoder too: ignored
    return state


def test_the_published_key_layout_loads():
    state = random_state_dict()
    for key, shape in PUBLISHED_LAYOUT.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(k.startswith("decoder.") for k in state) == 64
    model = TinyVideoDecoder.from_state_dict(state)
    assert torch.equal(model.decoder[22].weight, state["decoder.22.weight"])
    assert model.time_upscale == 4 and model.output_frames(21) == 81


def test_a_stage_without_temporal_growth_takes_the_last_frames_channels():
    state = random_state_dict(grow_everywhere=True)
    model = TinyVideoDecoder.from_state_dict(state)
    assert torch.equal(model.decoder[7].conv.weight, state["decoder.7.conv.weight"][256:])


def test_decode_gives_the_wan_frame_count_in_0_to_1():
    model = TinyVideoDecoder.from_state_dict(random_state_dict())
    frames = model.decode(torch.randn(2, 16, 3, 4, 6))
    assert frames.shape == (2, 3, 9, 32, 48)  # 1 + 4 * 2 frames, 8x the latent size
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0.01


@pytest.mark.parametrize("splits", [(1, 1, 1, 1), (1, 3), (2, 2)])
def test_streaming_chunk_by_chunk_equals_one_decode_of_the_whole_latent(splits):
    model = TinyVideoDecoder.from_state_dict(random_state_dict()).double()
    z = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = model.decode(z)
    stream, start, parts = model.stream(), 0, []
    for size in splits:
        parts.append(stream(z[:, :, start:start + size]))
        start += size
    assert [p.shape[2] for p in parts] == [4 * s - (3 if i == 0 else 0) for i, s in enumerate(splits)]
    # the same function in float64, but convolutions over other frame counts may sum in another
    # order (seen: 4e-12 apart on one x86 CPU, bitwise equal on another)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-10, atol=1e-10)


def test_frames_depend_on_earlier_latents_only():
    model = TinyVideoDecoder.from_state_dict(random_state_dict()).double()
    z = torch.randn(1, 16, 4, 4, 4, dtype=torch.float64)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    a, b = model.decode(z), model.decode(changed)
    first_affected = 1 + 4 * (2 - 1)  # video frames of latent frame 2 start here
    assert torch.equal(a[:, :, :first_affected], b[:, :, :first_affected])
    assert not torch.allclose(a[:, :, first_affected:], b[:, :, first_affected:])


def test_patch_size_and_channels_come_from_the_file():
    model = TinyVideoDecoder.from_state_dict(random_state_dict(latent_channels=48, patch_size=2))
    assert (model.latent_channels, model.patch_size) == (48, 2)
    assert model.decode(torch.randn(1, 48, 2, 2, 3)).shape == (1, 3, 5, 32, 48)  # 16x with the pixel patch


@pytest.mark.parametrize("edit, message", [
    (lambda s: {k: v for k, v in s.items() if not k.startswith("decoder.")}, "no 'decoder.*' weights"),
    (lambda s: {**s, "decoder.0.weight": torch.zeros(512, 16, 1, 1)}, "'super' TAEHV decoder"),
    (lambda s: {k: v for k, v in s.items() if k != "decoder.9.conv.2.weight"}, "missing ['9.conv.2.weight']"),
    (lambda s: {**s, "decoder.8.weight": torch.zeros(128, 256, 1, 1)}, "decoder.8.weight has shape [128, 256, 1, 1]"),
    (lambda s: {**s, "decoder.22.weight": torch.zeros(5, 64, 3, 3), "decoder.22.bias": torch.zeros(5)}, "not 3 x patch"),
])
def test_files_that_do_not_fit_say_why(edit, message):
    with pytest.raises(TinyVaeError) as err:
        TinyVideoDecoder.from_state_dict(edit(random_state_dict()), source="x.safetensors")
    assert message in str(err.value) and "x.safetensors" in str(err.value)


def test_wrong_latents_are_refused():
    model = TinyVideoDecoder.from_state_dict(random_state_dict())
    with pytest.raises(TinyVaeError, match=r"latents \[B, 16, T, H, W\]; got \[1, 4, 2, 8, 8\]"):
        model.decode(torch.zeros(1, 4, 2, 8, 8))


def test_load_from_safetensors_and_a_corrupt_file(tmp_path):
    path = tmp_path / "taew2_1.safetensors"
    state = random_state_dict()
    save_file(state, str(path))
    model = tiny_vae.load_tiny_decoder(str(path))
    assert torch.equal(model.decoder[1].weight, state["decoder.1.weight"])
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(TinyVaeError, match="broken.safetensors"):
        tiny_vae.load_tiny_decoder(str(bad))


def test_channels_last_gives_the_same_frames_and_every_convolution_sees_channels_last():
    """The layout cuDNN's fast kernels want (on by default on CUDA): the frame order survives the
    temporal growth and the previous-frame shift in that layout, for more than one video at once."""
    state = random_state_dict()
    plain = TinyVideoDecoder.from_state_dict(state).double()
    fast = TinyVideoDecoder.from_state_dict(state).double()
    z = torch.randn(2, 16, 4, 3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    layouts = []
    for module in fast.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_pre_hook(lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    reference, stream = plain.stream(channels_last=False), fast.stream(channels_last=True)
    for part in (slice(0, 1), slice(1, 3), slice(3, 4)):
        expected, got = reference(z[:, :, part]), stream(z[:, :, part])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=0, atol=1e-9)  # summation order only; a frame out of place is ~0.1
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} convolutions got NCHW input"
