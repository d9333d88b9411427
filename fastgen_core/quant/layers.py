"""Which Linear layers of a model are quantized: the architecture's transformer-block layers by
default, or the layers a pattern of globs names."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

# Layers quantized by default, per architecture (class names of the diffusion model, any in its
# MRO). Everything else stays in high precision: embeddings, timestep / modulation MLPs,
# Linear(1, d), the final projection and norms. The host's Flux, Wan and UNet names are theirs.
DEFAULT_LAYERS = {
    "DigitDiT": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "CausalWorldDiT": ["blocks.*.qkv", "blocks.*.proj", "blocks.*.fc1", "blocks.*.fc2"],
    "WanModel": ["blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
                 "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
                 "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img", "blocks.*.ffn.0", "blocks.*.ffn.2"],
    "Flux": ["double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.txt_attn.qkv",
             "double_blocks.*.txt_attn.proj", "double_blocks.*.img_mlp.0", "double_blocks.*.img_mlp.2",
             "double_blocks.*.txt_mlp.0", "double_blocks.*.txt_mlp.2", "single_blocks.*.linear1", "single_blocks.*.linear2"],
    "UNetModel": ["*transformer_blocks.*.attn1.to_*", "*transformer_blocks.*.attn2.to_*",
                  "*transformer_blocks.*.ff.net.0.proj", "*transformer_blocks.*.ff.net.2"],
}
# Fallback for other architectures: Linear layers inside numbered blocks, minus these words.
KEEP_WORDS = ("embed", "time", "modulation", "adaln", "ada", "norm", "final", "head", "proj_out", "mod.lin", "_in.")


def architecture_names(model: nn.Module) -> list[str]:
    return [cls.__name__ for cls in type(model).__mro__]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def parse_pattern(pattern: str) -> list[str]:
    return [p for p in re.split(r"[,\s]+", pattern.strip()) if p]


def default_layer(name: str, module: nn.Linear) -> bool:
    """The fallback rule: a Linear inside numbered blocks whose name has none of KEEP_WORDS."""
    lowered = f".{name.lower()}."
    return module.in_features > 1 and bool(re.search(r"\.\d+\.", lowered)) and not any(w in lowered for w in KEEP_WORDS)


def select_layers(model: nn.Module, pattern: str = "") -> list[str]:
    """Names of the Linear layers to quantize: the architecture's defaults, or those matching
    `pattern` (comma- or space-separated globs, e.g. "blocks.*.ffn.*"). Every glob must match."""
    layers = linear_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear layers to quantize")
    globs = parse_pattern(pattern)
    if not globs:
        arch = next((n for n in architecture_names(model) if n in DEFAULT_LAYERS), None)
        globs = DEFAULT_LAYERS.get(arch)
        if globs is None:
            chosen = [n for n, m in layers.items() if default_layer(n, m)]
            if not chosen:
                raise ValueError(f"no default layers for {type(model).__name__}: give a layer pattern (e.g. {next(iter(layers))})")
            return chosen
        return [n for n, m in layers.items() if m.in_features > 1 and any(fnmatch.fnmatchcase(n, g) for g in globs)]
    for glob in globs:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
            examples = ", ".join(list(layers)[:6])
            raise ValueError(f"layer pattern {glob!r} matches no Linear layer of this {type(model).__name__} "
                             f"(its {len(layers)} Linear layers are named like {examples})")
    return [n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in globs)]
