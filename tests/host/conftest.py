import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfy_host import ComfyServer, find_comfyui  # noqa: E402


@pytest.fixture(scope="session")
def host_files(tmp_path_factory):
    """Files placed in the host's model folders before it starts: a LoRA for the embedded teacher
    in the host's own key format, a corrupt safetensors and a foreign (non-FastGen) one."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("host_models")
    gen = torch.Generator().manual_seed(0)
    lora = {}
    for block in range(6):
        for name, (out_f, in_f) in {"qkv": (384, 128), "fc1": (512, 128)}.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=gen) * 0.3
            lora[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=gen) * 0.3
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(folder / "digit_test_lora.safetensors"))
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "foreign.safetensors"))
    files = {
        "loras": [str(folder / "digit_test_lora.safetensors")],
        "diffusion_models": [str(folder / "corrupt.safetensors"), str(folder / "foreign.safetensors")],
    }
    for kind, paths in student_files(folder).items():
        files.setdefault(kind, []).extend(paths)
    files["vae"] = wan_vae_file(folder)
    files["vae_approx"] = tiny_decoder_files(folder)
    files["diffusion_models"].append(world_model_file(folder))
    return files


def world_model_file(folder):
    """A tiny random game world model (64x64 frames, 1 block): the World Session runs it fast."""
    import torch

    from fastgen_core import checkpoint, networks, train

    config = networks.CausalWorldDiTConfig(dim=32, depth=1, heads=2)
    net = networks.CausalWorldDiT(config).init_weights(3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adaLN-Zero's zeroed output would draw the same grey frame whatever happens
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    path = str(folder / "tiny_world.safetensors")
    checkpoint.save_network(path, net, train.world_recipe(steps=2))
    return path


def tiny_decoder_files(folder):
    """A random tiny video decoder in the published taew2_1 layout (with an encoder key, as the real
    files have), and a file in the same folder that is no decoder."""
    import torch
    from safetensors.torch import save_file

    from fastgen_core.tiny_vae import TinyVideoDecoder

    gen = torch.Generator().manual_seed(5)
    state = {f"decoder.{k}": (torch.randn(v.shape, generator=gen) * 0.05).half()
             for k, v in TinyVideoDecoder(16).decoder.state_dict().items()}
    state["encoder.0.weight"] = torch.zeros(64, 3, 3, 3, dtype=torch.float16)
    save_file(state, str(folder / "taew2_1.safetensors"))
    save_file({"weight": torch.zeros(2, 2)}, str(folder / "not_a_decoder.safetensors"))
    return [str(folder / "taew2_1.safetensors"), str(folder / "not_a_decoder.safetensors")]


def wan_vae_file(folder):
    """The Wan 2.1 VAE with random weights, at its real width (the host fixes it: dim 96), fp16,
    ~250 MB, under the name the Wan workflows use. Needs the host's class for its key layout."""
    import torch
    from safetensors.torch import save_file

    path, _ = find_comfyui()
    if path is None:
        return []
    sys.path.insert(0, path)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probe
        from comfy.ldm.wan.vae import WanVAE
    finally:
        sys.path.remove(path)
    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True])
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in vae.state_dict().items():
        if key.endswith("gamma"):
            state[key] = torch.ones(value.shape)
        elif value.ndim <= 1:
            state[key] = torch.zeros(value.shape)
        else:  # fan-in scaled, so activations stay finite through the decoder
            state[key] = torch.randn(value.shape, generator=gen) / value[0].numel() ** 0.5
    out = str(folder / "wan_2.1_vae.safetensors")
    save_file({k: v.half().contiguous() for k, v in state.items()}, out)
    return [out]


# The recipe the tiny Wan student carries in its metadata (a lightx2v-like 4-step flow recipe).
TINY_WAN_RECIPE = dict(family="wan2.1", prediction="flow", steps=4, timesteps=[1000, 750, 500, 250], shift=5.0, cfg=1.0,
                       sampler="multistep_sde", method="dmd2")


class _Payload:
    """A pickle that would create `marker` when loaded: the loader must refuse it unrun."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def student_files(folder):
    """Tiny real architectures (Wan 2.1, SD1.5) and their LoRAs in every key format, plus the bad
    cases a student loader must refuse: a wrong-architecture and a wrong-size LoRA, a code pickle."""
    import torch
    from safetensors.torch import save_file
    from tiny_models import diffusers_wan_state_dict, lora_state_dict, save_safetensors, tiny_sd15_state_dict, tiny_wan_state_dict

    from fastgen_core.recipe import RECIPE_KEY, Recipe

    wan = tiny_wan_state_dict(seed=0)
    models = [save_safetensors(wan, str(folder / "tiny_wan.safetensors")),
              # under the name the Wan workflow uses, so the shipped graph runs as written
              save_safetensors(wan, str(folder / "wan2.1_t2v_14B_fp16.safetensors")),
              save_safetensors(wan, str(folder / "self_forcing_dmd.safetensors")),  # the causal workflow's model
              save_safetensors(tiny_sd15_state_dict(seed=0, dtype=torch.float16), str(folder / "tiny_sd15.safetensors"))]
    models.append(save_safetensors(diffusers_wan_state_dict(wan), str(folder / "tiny_wan_diffusers.safetensors")))
    student = str(folder / "tiny_wan_student.safetensors")
    save_file({k: v.contiguous() for k, v in wan.items()}, student, metadata={RECIPE_KEY: Recipe(**TINY_WAN_RECIPE).to_json()})
    models.append(student)
    # a FastGen training checkpoint (.pth): {"model": {"net": net.* + net_ema.*}, "iteration": N}
    ema = tiny_wan_state_dict(seed=1)
    torch.save({"model": {"net": {**{f"net.{k}": v for k, v in wan.items()}, **{f"net_ema.{k}": v for k, v in ema.items()}}},
                "iteration": 100}, str(folder / "tiny_wan_fastgen.pth"))
    torch.save({"model": wan, "config": _Payload(str(folder / "payload-ran"))}, str(folder / "tiny_wan_pickled_code.pth"))
    models += [str(folder / "tiny_wan_fastgen.pth"), str(folder / "tiny_wan_pickled_code.pth")]

    sd15_keys = {k: v.shape for k, v in tiny_sd15_state_dict(seed=0).items()}
    loras = []
    for fmt in ("comfy", "peft", "kohya"):
        loras.append(save_safetensors(lora_state_dict(wan, fmt, seed=1, std=0.2), str(folder / f"tiny_wan_lora_{fmt}.safetensors")))
        loras.append(save_safetensors(lora_state_dict(sd15_keys, fmt, seed=1, prefix_filter="input_blocks"),
                                      str(folder / f"tiny_sd15_lora_{fmt}.safetensors")))
    loras.append(save_safetensors(lora_state_dict(tiny_wan_state_dict(dim=384), "comfy"), str(folder / "wan_dim384_lora.safetensors")))
    # named as lightx2v distributes its LoRA: the loader must recognise it and attach that recipe
    loras.append(save_safetensors(lora_state_dict(wan, "comfy", seed=2, std=0.2),
                                  str(folder / "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors")))
    return {"diffusion_models": models, "loras": loras}


@pytest.fixture(scope="session")
def comfy(host_files):
    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    server = ComfyServer(path, extra_models=host_files).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.get("/object_info")
