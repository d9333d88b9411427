import os

import pytest
import torch
from safetensors.torch import save_file

from fastgen_core import files, students
from fastgen_core.networks import DigitDiT, DigitDiTConfig
from fastgen_core.recipe import RECIPE_KEY, Recipe

TINY = DigitDiTConfig(dim=32, depth=2, heads=2)


def digit_state_dict(seed=0):
    return {k: v.clone() for k, v in DigitDiT(TINY).init_weights(seed).state_dict().items()}


def test_safetensors_student_keeps_metadata(tmp_path):
    sd = digit_state_dict()
    recipe = Recipe(family="fastgen-digits", prediction="flow", steps=4, method="dmd2")
    path = str(tmp_path / "student.safetensors")
    save_file(sd, path, metadata={RECIPE_KEY: recipe.to_json()})
    student = students.load_student_file(path)
    assert student.container == "safetensors"
    assert Recipe.from_json(student.metadata[RECIPE_KEY]) == recipe
    assert files.read_metadata(path) == student.metadata
    torch.testing.assert_close(student.state_dict["blocks.0.qkv.weight"], sd["blocks.0.qkv.weight"])


def test_pth_state_dict_loads_with_weights_only(tmp_path):
    sd = digit_state_dict()
    path = str(tmp_path / "student.pth")
    torch.save(sd, path)
    student = students.load_student_file(path)
    assert student.container == "pickle (weights only)" and student.metadata == {}
    assert set(student.state_dict) == set(sd)


def test_fastgen_training_checkpoint_yields_the_ema_network(tmp_path):
    # FastGen's Checkpointer saves {"model": {"net": <state_dict with net.* and net_ema.*>}, "iteration": N, ...}.
    net, ema = digit_state_dict(0), digit_state_dict(1)
    model_state = {**{f"net.{k}": v for k, v in net.items()}, **{f"net_ema.{k}": v for k, v in ema.items()}}
    path = str(tmp_path / "0005000.pth")
    torch.save({"model": {"net": model_state}, "optimizer": None, "scheduler": None, "iteration": 5000}, path)
    student = students.load_student_file(path)
    assert set(student.state_dict) == set(net)
    torch.testing.assert_close(student.state_dict["final_proj.weight"], ema["final_proj.weight"])


class _Payload:
    """A pickle that runs code when loaded: it would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "payload-ran")
    path = str(tmp_path / "student.pth")
    torch.save({"model": digit_state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(students.StudentFileError, match="refused to load.*needs code"):
        students.load_student_file(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name,content,message", [
    ("cut.pth", None, "not a readable PyTorch checkpoint"),
    ("cut.safetensors", None, "not a readable safetensors"),
    ("model.gguf", b"GGUF", "unsupported student file type"),
    ("empty.pth", {}, "no network weights"),
])
def test_bad_files_say_what_is_wrong(tmp_path, name, content, message):
    path = str(tmp_path / name)
    if content is None:  # a real file cut in half
        good = str(tmp_path / ("good" + os.path.splitext(name)[1]))
        (torch.save if name.endswith(".pth") else save_file)(digit_state_dict(), good)
        with open(good, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif isinstance(content, bytes):
        with open(path, "wb") as f:
            f.write(content)
    else:
        torch.save(content, path)
    with pytest.raises(students.StudentFileError, match=message):
        students.load_student_file(path)
    with pytest.raises(students.StudentFileError, match="not found"):
        students.load_student_file(str(tmp_path / "missing.safetensors"))


def lora_for(modules: dict, fmt: str, rank=2):
    """A LoRA over {module: (out, in)} in one of the host's three key formats."""
    sd = {}
    for module, (out_features, in_features) in modules.items():
        up, down = torch.randn(out_features, rank), torch.randn(rank, in_features)
        if fmt == "comfy":
            sd[f"diffusion_model.{module}.lora_up.weight"], sd[f"diffusion_model.{module}.lora_down.weight"] = up, down
            sd[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
        elif fmt == "peft":
            sd[f"diffusion_model.{module}.lora_B.weight"], sd[f"diffusion_model.{module}.lora_A.weight"] = up, down
        else:
            name = "lora_unet_" + module.replace(".", "_")
            sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"], sd[f"{name}.alpha"] = up, down, torch.tensor(1.0)
    return sd


DIGIT_SHAPES = {k: tuple(v.shape) for k, v in digit_state_dict().items()}
DIGIT_LAYERS = {"blocks.0.qkv": DIGIT_SHAPES["blocks.0.qkv.weight"], "blocks.1.fc1": DIGIT_SHAPES["blocks.1.fc1.weight"]}
WAN_LAYERS = {"blocks.0.self_attn.q": (256, 256), "blocks.0.cross_attn.k": (256, 256)}


@pytest.mark.parametrize("fmt", students.LORA_FORMATS)
def test_lora_formats_are_recognised_and_fit_their_model(fmt):
    lora = lora_for(DIGIT_LAYERS, fmt)
    assert students.lora_format(lora) == fmt
    assert len(students.lora_module_names(lora)) == 2
    accepted = students.generic_lora_names(DIGIT_SHAPES)
    if fmt == "peft":  # the host maps PEFT names through the same generic names
        assert all(name in accepted for name in students.lora_module_names(lora))
    assert students.check_lora_fits(lora, accepted) == []
    assert students.lora_format(digit_state_dict()) is None


@pytest.mark.parametrize("fmt", students.LORA_FORMATS)
def test_lora_for_another_architecture_is_named_in_the_error(fmt):
    lora = lora_for(WAN_LAYERS, fmt)
    with pytest.raises(students.StudentFileError) as err:
        students.check_lora_fits(lora, students.generic_lora_names(DIGIT_SHAPES), lora_name="lightx2v.safetensors",
                                 model_name="the digit model")
    message = str(err.value)
    assert "lightx2v.safetensors does not fit the digit model" in message
    assert "made for wan" in message and "fastgen-digits" in message


def test_lora_for_another_size_and_partial_lora():
    wrong_size = lora_for({"blocks.0.qkv": (7, 5)}, "comfy")
    with pytest.raises(students.StudentFileError, match="other sizes.*7x5"):
        students.check_lora_fits(wrong_size, students.generic_lora_names(DIGIT_SHAPES))
    partial = lora_for({**DIGIT_LAYERS, "blocks.9.qkv": (96, 32)}, "comfy")
    assert students.check_lora_fits(partial, students.generic_lora_names(DIGIT_SHAPES)) == ["diffusion_model.blocks.9.qkv"]


def test_family_and_layout_guesses():
    assert students.guess_family(digit_state_dict()) == "fastgen-digits"
    assert students.guess_family(["diffusion_model.head.modulation", "diffusion_model.blocks.0.self_attn.q.weight"]) == "wan"
    assert students.guess_family(["lora_unet_double_blocks_0_img_attn_qkv"]) == "flux"
    assert students.guess_family(["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"]) == "sdxl"
    assert students.guess_family(["something.else"]) is None
    assert students.diffusers_layout({"conv_in.weight": 0, "time_embedding.linear_1.weight": 0, "down_blocks.0.x": 0}) == "unet"
    assert students.diffusers_layout(digit_state_dict()) is None
    wan_diffusers = ["condition_embedder.text_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight", "patch_embedding.weight"]
    assert students.diffusers_layout(dict.fromkeys(wan_diffusers)) == "transformer"
    assert students.guess_family(wan_diffusers) == "wan"
    qwen_native = ["transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.img_mod.1.weight", "img_in.weight"]
    assert students.diffusers_layout(dict.fromkeys(qwen_native)) is None


def test_wan_diffusers_names_map_to_the_original_wan_names():
    diffusers = ["scale_shift_table", "blocks.3.scale_shift_table", "blocks.3.attn1.to_out.0.weight", "blocks.3.attn2.add_k_proj.bias",
                 "blocks.3.attn2.norm_added_k.weight", "blocks.3.norm2.bias", "blocks.3.ffn.net.0.proj.weight",
                 "condition_embedder.image_embedder.ff.net.2.weight", "condition_embedder.time_proj.bias", "proj_out.weight",
                 "patch_embedding.weight"]
    native = students.wan_diffusers_to_native(dict.fromkeys(diffusers))
    assert list(native) == ["head.modulation", "blocks.3.modulation", "blocks.3.self_attn.o.weight", "blocks.3.cross_attn.k_img.bias",
                            "blocks.3.cross_attn.norm_k_img.weight", "blocks.3.norm3.bias", "blocks.3.ffn.0.weight",
                            "img_emb.proj.3.weight", "time_projection.1.bias", "head.head.weight", "patch_embedding.weight"]
