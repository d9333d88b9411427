"""Tiny synthetic diffusion models and LoRAs that a real ComfyUI (v0.3.64) loads as real architectures.

This module imports only torch and safetensors, so the test process can build the files and hand them to a
ComfyUI server (e.g. `models/diffusion_models/`, `models/loras/`) without importing ComfyUI itself.

- `tiny_wan_state_dict`: Wan 2.1 T2V in ComfyUI's native layout (comfy/ldm/wan/model.py). Detection
  (comfy/model_detection.py) keys off `head.modulation`; num_heads = dim // 128, text_dim 4096, in_dim 16,
  patch (1, 2, 2) are fixed by the host, so `dim` must be a multiple of 128.
- `tiny_sd15_state_dict`: a one-level SD1.5 UNet in the native ldm layout. The host's SD15 config pins
  model_channels 320 and context_dim 768 (comfy/supported_models.py, class SD15), so this is as small as
  detection allows: ~25.8 M parameters (103 MB in fp32, half that in fp16).
- `diffusers_sd15_state_dict`: the same weights under diffusers UNet2DConditionModel names. The host does NOT
  load this tiny diffusers UNet: its diffusers detection only matches full-size configs
  (comfy/model_detection.py, unet_config_from_diffusers_unet); it is for testing our own layout handling.
- `lora_state_dict`: a LoRA over the model's 2-D Linear weights in one of three key formats the host accepts.

All tensors come from a seeded torch.Generator, so a given call returns the same weights every time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import save_file

WAN_TEXT_DIM = 4096  # umt5-xxl width; the host fixes it
WAN_IN_DIM = 16  # Wan 2.1 latent channels (Wan 2.2's 48-channel out_dim would be detected as WAN22_T2V)
WAN_FREQ_DIM = 256
SD15_CHANNELS = 320  # the host's SD15 detection requires exactly 320 ...
SD15_CONTEXT = 768  # ... and CLIP-L context width 768 (1024 would be SD2.x)
LORA_FORMATS = ("comfy", "peft", "kohya")


def _linear(shapes: dict, name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _norm(shapes: dict, name: str, n: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n,)
    if bias:
        shapes[f"{name}.bias"] = (n,)


def _conv(shapes: dict, name: str, n_in: int, n_out: int, kernel: tuple[int, ...]) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in, *kernel)
    shapes[f"{name}.bias"] = (n_out,)


def _fill(shapes: dict[str, tuple[int, ...]], seed: int, std: float, dtype: torch.dtype, device="cpu") -> dict[str, torch.Tensor]:
    """Random N(0, std^2) tensors, except norm scales (the only 1-D `.weight`s here), which are ones.
    `device` draws them there (a full-size model on a GPU: seconds instead of minutes on the CPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if len(shape) == 1 and key.endswith(".weight"):
            t = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g, device=device) * std).to(dtype)
        out[key] = t
    return out


def tiny_wan_state_dict(
    dim: int = 256, layers: int = 2, seed: int = 0, ffn_dim: int | None = None, std: float = 0.02, dtype: torch.dtype = torch.float32,
    device="cpu",
) -> dict[str, torch.Tensor]:
    """A Wan 2.1 T2V diffusion model (UNETLoader detects WAN21_T2V / model_base.WAN21, flow). ffn_dim defaults to 4 * dim."""
    if dim % 128:
        raise ValueError("the host derives num_heads = dim // 128, so dim must be a multiple of 128")
    ffn = ffn_dim or 4 * dim
    s: dict[str, tuple[int, ...]] = {}
    _conv(s, "patch_embedding", WAN_IN_DIM, dim, (1, 2, 2))
    _linear(s, "text_embedding.0", WAN_TEXT_DIM, dim)
    _linear(s, "text_embedding.2", dim, dim)
    _linear(s, "time_embedding.0", WAN_FREQ_DIM, dim)
    _linear(s, "time_embedding.2", dim, dim)
    _linear(s, "time_projection.1", dim, 6 * dim)
    for i in range(layers):
        b = f"blocks.{i}"
        s[f"{b}.modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):  # T2V cross-attention has the same q/k/v/o + qk-norm as self-attention
            for proj in "qkvo":
                _linear(s, f"{b}.{attn}.{proj}", dim, dim)
            _norm(s, f"{b}.{attn}.norm_q", dim, bias=False)
            _norm(s, f"{b}.{attn}.norm_k", dim, bias=False)
        _norm(s, f"{b}.norm3", dim)  # norm1/norm2 have no affine weights
        _linear(s, f"{b}.ffn.0", dim, ffn)
        _linear(s, f"{b}.ffn.2", ffn, dim)
    s["head.modulation"] = (1, 2, dim)  # the detection key
    _linear(s, "head.head", dim, WAN_IN_DIM * 4)  # out_dim * prod(patch); out_dim = rows // 4
    return _fill(s, seed, std, dtype, device)


def _resblock(s: dict, p: str, c_in: int, c_out: int, emb: int) -> None:
    _norm(s, f"{p}.in_layers.0", c_in)
    _conv(s, f"{p}.in_layers.2", c_in, c_out, (3, 3))
    _linear(s, f"{p}.emb_layers.1", emb, c_out)
    _norm(s, f"{p}.out_layers.0", c_out)
    _conv(s, f"{p}.out_layers.3", c_out, c_out, (3, 3))
    if c_in != c_out:
        _conv(s, f"{p}.skip_connection", c_in, c_out, (1, 1))


def _transformer(s: dict, p: str, c: int, context: int) -> None:
    """SpatialTransformer of depth 1 with conv proj_in/proj_out (use_linear_in_transformer False, as in SD1.5)."""
    _norm(s, f"{p}.norm", c)
    _conv(s, f"{p}.proj_in", c, c, (1, 1))
    t = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", context)):
        _linear(s, f"{t}.{attn}.to_q", c, c, bias=False)
        _linear(s, f"{t}.{attn}.to_k", kv, c, bias=False)
        _linear(s, f"{t}.{attn}.to_v", kv, c, bias=False)
        _linear(s, f"{t}.{attn}.to_out.0", c, c)
    _linear(s, f"{t}.ff.net.0.proj", c, 8 * c)  # GEGLU: 2 x 4c
    _linear(s, f"{t}.ff.net.2", 4 * c, c)
    for n in ("norm1", "norm2", "norm3"):
        _norm(s, f"{t}.{n}", c)
    _conv(s, f"{p}.proj_out", c, c, (1, 1))


def tiny_sd15_state_dict(seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A one-level SD1.5 UNet (channel_mult [1], one res block, transformer depth 1 everywhere, no down/upsampling).

    UNETLoader detects it as supported_models.SD15 / model_base.BaseModel with ModelType.EPS.
    """
    c, emb = SD15_CHANNELS, 4 * SD15_CHANNELS
    s: dict[str, tuple[int, ...]] = {}
    _linear(s, "time_embed.0", c, emb)
    _linear(s, "time_embed.2", emb, emb)
    _conv(s, "input_blocks.0.0", 4, c, (3, 3))
    _resblock(s, "input_blocks.1.0", c, c, emb)
    _transformer(s, "input_blocks.1.1", c, SD15_CONTEXT)
    _resblock(s, "middle_block.0", c, c, emb)
    _transformer(s, "middle_block.1", c, SD15_CONTEXT)
    _resblock(s, "middle_block.2", c, c, emb)
    for i in range(2):  # num_res_blocks + 1 output blocks, each fed a skip connection (2c in)
        _resblock(s, f"output_blocks.{i}.0", 2 * c, c, emb)
        _transformer(s, f"output_blocks.{i}.1", c, SD15_CONTEXT)
    _norm(s, "out.0", c)
    _conv(s, "out.2", c, 4, (3, 3))
    return _fill(s, seed, std, dtype)


# ldm prefix -> diffusers prefix for tiny_sd15_state_dict's layout. It agrees key for key with the host's
# comfy.utils.unet_to_diffusers(unet_config) table (UNET_MAP_RESNET / UNET_MAP_ATTENTIONS / UNET_MAP_BASIC).
_SD15_DIFFUSERS_PREFIXES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "input_blocks.1.1": "down_blocks.0.attentions.0",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_RESNET_PARTS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _ldm_to_diffusers(key: str) -> str:
    for ldm, diff in _SD15_DIFFUSERS_PREFIXES.items():
        if key.startswith(ldm + "."):
            rest = key[len(ldm) + 1 :]
            if ".resnets." in diff:
                module, param = rest.rsplit(".", 1)
                rest = f"{_RESNET_PARTS[module]}.{param}"
            return f"{diff}.{rest}"  # attention internals keep their names
    raise KeyError(f"no diffusers name for {key!r} (only tiny_sd15_state_dict's layout is known)")


def diffusers_sd15_state_dict(sd: Mapping[str, torch.Tensor], mapping: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of a native-layout SD1.5 UNet under diffusers UNet2DConditionModel names.

    mapping: {diffusers_key: ldm_key}, e.g. the host's comfy.utils.unet_to_diffusers(model_config.unet_config)
    (entries whose ldm key is absent, such as down/upsamplers of a one-level UNet, are skipped). Default: the
    built-in table for tiny_sd15_state_dict's layout. Raises KeyError if a weight would be dropped.
    """
    if mapping is None:
        mapping = {_ldm_to_diffusers(k): k for k in sd}
    out = {d: sd[k] for d, k in mapping.items() if k in sd}
    dropped = set(sd) - set(mapping.values())
    if dropped:
        raise KeyError(f"the mapping has no diffusers name for {sorted(dropped)[:5]} ({len(dropped)} keys)")
    return out


def lora_state_dict(
    model_keys: Mapping[str, torch.Tensor | tuple[int, ...]],
    fmt: str,
    rank: int = 4,
    seed: int = 0,
    prefix_filter: str | tuple[str, ...] | None = None,
    std: float = 0.02,
) -> dict[str, torch.Tensor]:
    """A LoRA over every 2-D `.weight` (Linear) in model_keys, in a key format comfy/lora.py loads.

    model_keys: {key: tensor or shape} of the diffusion model, with or without the `diffusion_model.` prefix
    (e.g. model.model.diffusion_model.state_dict(), or the dict from tiny_*_state_dict). prefix_filter keeps only
    modules whose name (without `diffusion_model.`) starts with it. Both factors are random and non-zero, so the
    LoRA changes outputs; alpha = rank (scale 1).

    fmt "comfy": diffusion_model.<module>.lora_up.weight / .lora_down.weight / .alpha
    fmt "peft":  diffusion_model.<module>.lora_B.weight / .lora_A.weight (no alpha, as PEFT saves it: scale 1)
    fmt "kohya": lora_unet_<module with dots as underscores>.lora_up.weight / .lora_down.weight / .alpha
    """
    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {LORA_FORMATS}, not {fmt!r}")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, value in model_keys.items():
        shape = tuple(getattr(value, "shape", value))
        module = key.removeprefix("diffusion_model.")
        if len(shape) != 2 or not module.endswith(".weight"):
            continue
        module = module[: -len(".weight")]
        if prefix_filter is not None and not module.startswith(prefix_filter):
            continue
        n_out, n_in = shape
        down = torch.randn(rank, n_in, generator=g) * std
        up = torch.randn(n_out, rank, generator=g) * std
        if fmt == "peft":
            out[f"diffusion_model.{module}.lora_A.weight"] = down
            out[f"diffusion_model.{module}.lora_B.weight"] = up
            continue
        base = f"diffusion_model.{module}" if fmt == "comfy" else "lora_unet_" + module.replace(".", "_")
        out[f"{base}.lora_up.weight"] = up
        out[f"{base}.lora_down.weight"] = down
        out[f"{base}.alpha"] = torch.tensor(float(rank))
    return out


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str) -> str:
    """Write a state dict as .safetensors (contiguous copies) and return the path."""
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def diffusers_wan_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A native Wan 2.1 T2V state dict under diffusers' WanTransformer3DModel names (as diffusers'
    scripts/convert_wan_to_diffusers.py writes them), to test loading diffusers-layout Wan students."""
    top = {"text_embedding.0": "condition_embedder.text_embedder.linear_1", "text_embedding.2": "condition_embedder.text_embedder.linear_2",
           "time_embedding.0": "condition_embedder.time_embedder.linear_1", "time_embedding.2": "condition_embedder.time_embedder.linear_2",
           "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "patch_embedding": "patch_embedding"}
    block = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v", "self_attn.o": "attn1.to_out.0",
             "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k", "cross_attn.q": "attn2.to_q",
             "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0",
             "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k", "norm3": "norm2",
             "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
    out = {}
    for key, tensor in sd.items():
        if key == "head.modulation":
            out["scale_shift_table"] = tensor
            continue
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1) if rest != "modulation" else ("modulation", None)
            if module == "modulation":
                out[f"blocks.{index}.scale_shift_table"] = tensor
            else:
                out[f"blocks.{index}.{block[module]}.{param}"] = tensor
            continue
        module, param = key.rsplit(".", 1)
        out[f"{top[module]}.{param}"] = tensor
    return out
