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
    return {
        "loras": [str(folder / "digit_test_lora.safetensors")],
        "diffusion_models": [str(folder / "corrupt.safetensors"), str(folder / "foreign.safetensors")],
    }


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
