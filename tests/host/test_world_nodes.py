"""#7 in the real host: the host's own Wan code made block-causal with a KV cache (exactness
against the masked full forward), and the Causal Video Sampler on a tiny random Wan."""

import pytest
import torch
from test_students_nodes import WAN, graph, node_text, run_latent, unet


def test_cached_wan_chunks_equal_the_masked_full_forward_of_the_host_wan(comfy):
    prompt = graph(unet("tiny_wan.safetensors"), ["m", 0], family=WAN)
    prompt = {k: v for k, v in prompt.items() if k in ("m", "c1")}
    prompt["e"] = {"class_type": "FastGenTestCausalExactness", "inputs": {"model": ["m", 0], "positive": ["c1", 0],
                                                                          "chunk_frames": 2, "chunks": 3}}
    entry = comfy.run_prompt(prompt)
    errors, leak, cache = node_text(entry, "e").split(" | ")
    assert all(float(e) <= 1e-5 for e in errors.split()), errors
    assert float(leak.split()[1]) > 1e-3, "the mask changed nothing: the test would not see a leak"
    assert cache == "cache 4"


def causal_graph(latent_frames=10, chunk_frames=2, window=0, sink=2, steps=2, seed=0):
    prompt = graph(unet("tiny_wan.safetensors"), ["m", 0], family=WAN)
    prompt["l"] = {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": 32, "height": 32, "length": (latent_frames - 1) * 4 + 1, "batch_size": 1}}
    prompt["s"] = {"class_type": "FastGenCausalVideoSampler", "inputs": {
        "model": ["m", 0], "positive": ["c1", 0], "latent": ["l", 0], "chunk_frames": chunk_frames, "steps": steps,
        "first_chunk_steps": 0, "window_frames": window, "sink_frames": sink, "seed": seed}}
    return prompt


def test_causal_video_sampler_generates_five_chunks_on_a_tiny_wan(comfy):
    latent, entry = run_latent(comfy, causal_graph())
    assert latent.shape == (1, 16, 10, 4, 4) and torch.isfinite(latent).all()
    text = node_text(entry, "s")
    # the last chunk's context pass is skipped: no later chunk would read its keys
    assert text.startswith("5 chunks of 2 latent frames, 2 steps each") and "cache holds 8 frames" in text


def test_compiled_blocks_give_the_eager_video(comfy):
    """compile on: the host's Wan blocks through torch.compile (attention eager); the latent equals
    the eager run's within float tolerance, and the node says the blocks were compiled."""
    eager, _ = run_latent(comfy, causal_graph(latent_frames=6))
    prompt = causal_graph(latent_frames=6)
    prompt["s"]["inputs"]["compile"] = True
    compiled, entry = run_latent(comfy, prompt)
    assert "blocks compiled by torch.compile" in node_text(entry, "s"), node_text(entry, "s")
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4), (compiled - eager).abs().max()


@pytest.mark.parametrize("mode", ["this run", "kept"])
def test_cuda_graphs_on_a_cpu_turn_themselves_off_and_say_why(comfy, mode):
    """cuda_graphs on the CPU host: the run is the plain run bit for bit, and the node says why the
    graphs are off (on a GPU: benchmarks/causal_video.py --variants compile+chunkgraphs+tiny --verify)."""
    plain, _ = run_latent(comfy, causal_graph(latent_frames=6))
    prompt = causal_graph(latent_frames=6)
    prompt["s"]["inputs"]["cuda_graphs"] = mode
    graphed, entry = run_latent(comfy, prompt)
    assert "CUDA graphs off: CUDA graphs need CUDA tensors" in node_text(entry, "s"), node_text(entry, "s")
    assert torch.equal(graphed, plain)


def test_kept_graphs_serve_only_runs_made_the_same_way(comfy):
    prompt = graph(unet("tiny_wan.safetensors"), ["m", 0], family=WAN)
    prompt = {"m": prompt["m"], "k": {"class_type": "FastGenTestKeptGraphs", "inputs": {"model": ["m", 0]}}}
    text = node_text(comfy.run_prompt(prompt), "k")
    assert "=no" not in text and text.count("=yes") == 9, text


def test_a_quantized_model_runs_the_loop_and_the_node_says_what_it_costs(comfy):
    prompt = causal_graph(latent_frames=4)
    prompt["q"] = {"class_type": "FastGenQuantizeModel",
                   "inputs": {"model": ["m", 0], "format": "int8", "layers": "", "calibrate": False, "steps": 1}}
    prompt["s"]["inputs"]["model"] = ["q", 0]
    latent, entry = run_latent(comfy, prompt)
    plain, plain_entry = run_latent(comfy, causal_graph(latent_frames=4))
    assert torch.isfinite(latent).all() and not torch.equal(latent, plain)
    assert "saves memory, not time" in node_text(entry, "s") and "quantized" not in node_text(plain_entry, "s")


def test_rolling_window_evicts_and_keeps_the_sink(comfy):
    latent, entry = run_latent(comfy, causal_graph(window=2, sink=2))
    assert torch.isfinite(latent).all()
    assert "cache holds 4 frames" in node_text(entry, "s") and "4 evicted" in node_text(entry, "s")


def test_later_chunks_depend_on_earlier_ones_and_not_the_reverse(comfy):
    """Causality through the node: a video's first chunks are the same however long it is (each
    chunk's noise is drawn in chunk order), and a different first chunk (first_chunk_steps) changes
    the rest."""
    a, _ = run_latent(comfy, causal_graph(seed=1))
    short, _ = run_latent(comfy, causal_graph(latent_frames=4, seed=1))
    assert torch.allclose(short, a[:, :, :4], atol=1e-6, rtol=1e-5), (short - a[:, :, :4]).abs().max()
    prompt = causal_graph(seed=1)
    prompt["s"]["inputs"]["first_chunk_steps"] = 4
    b, _ = run_latent(comfy, prompt)
    assert not torch.allclose(a[:, :, :2], b[:, :, :2])
    assert not torch.allclose(a[:, :, 2:], b[:, :, 2:]), "later chunks ignored their context"


def test_streamed_frames_equal_the_stock_decode_of_the_whole_latent(comfy):
    """With the Wan VAE connected, the node decodes each chunk as it finishes (the VAE's causal cache
    kept between chunks): its frames must be the stock VAE Decode of its whole latent."""
    from prompts import images

    prompt = causal_graph(latent_frames=4, chunk_frames=2)
    prompt["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}}
    prompt["s"]["inputs"]["vae"] = ["vae", 0]
    prompt["d"] = {"class_type": "VAEDecode", "inputs": {"samples": ["s", 0], "vae": ["vae", 0]}}
    del prompt["out"]
    stock = {**prompt, "save": {"class_type": "SaveImage", "inputs": {"images": ["d", 0], "filename_prefix": "stock"}}}
    streamed = {**prompt, "save": {"class_type": "SaveImage", "inputs": {"images": ["s", 1], "filename_prefix": "streamed"}}}
    a, b = images(comfy, stock), images(comfy, streamed)
    assert a.shape == (13, 32, 32) and b.shape == a.shape  # 4 latent frames -> 1 + 3 * 4 video frames
    assert a.std() > 0.01, "the random VAE decodes to a flat image: the comparison would be empty"
    assert abs(a - b).max() <= 1 / 255


def test_tiny_decoder_streams_the_frames_of_one_whole_tiny_decode(comfy):
    """With a tiny decoder connected (taew2_1 layout, random), the node streams each chunk through it:
    the frames equal FastGen Tiny Video Decode of its whole latent, with the Wan frame count."""
    from prompts import images

    prompt = causal_graph(latent_frames=4, chunk_frames=2)
    prompt["tiny"] = {"class_type": "FastGenLoadTinyVideoDecoder", "inputs": {"decoder_name": "taew2_1.safetensors"}}
    prompt["s"]["inputs"]["tiny_decoder"] = ["tiny", 0]
    prompt["d"] = {"class_type": "FastGenTinyVideoDecode", "inputs": {"tiny_decoder": ["tiny", 0], "samples": ["s", 0],
                                                                       "chunk_frames": 8}}
    del prompt["out"]
    whole = {**prompt, "save": {"class_type": "SaveImage", "inputs": {"images": ["d", 0], "filename_prefix": "whole"}}}
    streamed = {**prompt, "save": {"class_type": "SaveImage", "inputs": {"images": ["s", 1], "filename_prefix": "tiny"}}}
    a, b = images(comfy, whole), images(comfy, streamed)
    assert a.shape == (13, 32, 32) and b.shape == a.shape
    assert a.std() > 0.01, "the random decoder gives a flat image: the comparison would be empty"
    assert abs(a - b).max() <= 1 / 255


def test_a_file_that_is_no_tiny_decoder_is_named_in_the_error(comfy):
    prompt = {"tiny": {"class_type": "FastGenLoadTinyVideoDecoder", "inputs": {"decoder_name": "not_a_decoder.safetensors"}},
              "l": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 5, "batch_size": 1}},
              "d": {"class_type": "FastGenTinyVideoDecode", "inputs": {"tiny_decoder": ["tiny", 0], "samples": ["l", 0],
                                                                        "chunk_frames": 8}},
              "p": {"class_type": "PreviewImage", "inputs": {"images": ["d", 0]}}}
    with pytest.raises(AssertionError, match=r"FastGenLoadTinyVideoDecoder .*not_a_decoder.safetensors holds no 'decoder.\*' weights"):
        comfy.run_prompt(prompt)


def test_the_context_pass_runs_the_quantized_layers_and_no_cache(comfy):
    """Quantize then Cache before the Causal Video Sampler: the context pass (outside sampling, where
    the host hands out no wrappers) gets the quantize wrapper, so the cached keys come from the same
    quantized layers as the denoising passes, and not the cache's, which could skip the blocks."""
    prompt = graph(unet("tiny_wan.safetensors"), ["m", 0], family=WAN)
    prompt = {k: v for k, v in prompt.items() if k in ("m", "c1")}
    prompt["q"] = {"class_type": "FastGenQuantizeModel",
                   "inputs": {"model": ["m", 0], "format": "int8", "layers": "", "calibrate": False, "steps": 2}}
    prompt["k"] = {"class_type": "FastGenCache", "inputs": {"model": ["q", 0], "policy": "step", "threshold": 0.5,
                                                            "start": 0.0, "end": 1.0}}
    prompt["quantized"] = {"class_type": "FastGenTestContextPass", "inputs": {"model": ["k", 0], "positive": ["c1", 0]}}
    prompt["plain"] = {"class_type": "FastGenTestContextPass", "inputs": {"model": ["m", 0], "positive": ["c1", 0]}}
    entry = comfy.run_prompt(prompt)
    keys, difference = node_text(entry, "quantized").split(" | ")
    assert keys == "wrappers fastgen_quant" and float(difference.split()[1]) > 0, node_text(entry, "quantized")
    assert node_text(entry, "plain") == "wrappers - | difference 0.000e+00"
    # and the whole loop runs on that MODEL
    video = causal_graph(latent_frames=4)
    video["q"], video["k"] = prompt["q"], prompt["k"]
    video["s"]["inputs"]["model"] = ["k", 0]
    latent, _ = run_latent(comfy, video)
    assert torch.isfinite(latent).all()


def test_frame_sink_gathers_chunks_in_order_and_grows_past_its_capacity():
    from comfy_host import import_host_in_process, import_pack_module

    causal_loop = import_host_in_process(lambda: import_pack_module("nodes.host.causal_loop"))
    chunks = [torch.full((n, 2, 3, 3), float(i)) for i, n in enumerate((1, 4, 4))]
    for capacity in (9, 2, None):
        sink = causal_loop.FrameSink(capacity)
        for chunk in chunks:
            sink.add(chunk)
        assert torch.equal(sink.result(), torch.cat(chunks)), capacity
    assert causal_loop.FrameSink(4).result() is None
