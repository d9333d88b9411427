"""The prompt's conditioning as the model's own inputs, made by the host's `extra_conds`."""

from __future__ import annotations

import torch


def model_conds(base, conditioning, name: str, latent_shape, device) -> list[dict]:
    """One dict of apply_model inputs per prompt, made by the host's own `extra_conds` (as its
    samplers do), with tensors cloned out of inference mode so autograd can use them."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty")
    noise = torch.zeros((1, *latent_shape), device=device)
    rows = []
    for tensor, options in conditioning:
        params = {**options, "device": device, "noise": noise, "prompt_type": name}
        params.setdefault("width", latent_shape[-1] * 8)
        params.setdefault("height", latent_shape[-2] * 8)
        if tensor is not None:
            params["cross_attn"] = tensor[:1].to(device)
        conds = base.extra_conds(**params)
        row = {}
        for key, cond in conds.items():
            value = cond.process_cond(batch_size=1, area=None, device=device).cond
            row[key] = value.detach().clone().to(device) if torch.is_tensor(value) else value
        rows.append(row)
    shapes = {key: rows[0][key].shape for key in rows[0] if torch.is_tensor(rows[0][key])}
    for row in rows[1:]:
        if {k: v.shape for k, v in row.items() if torch.is_tensor(v)} != shapes:
            raise ValueError(f"{name} conditionings have different shapes (token lengths); encode them with one text encoder")
    return rows




def conditioning_on(conditioning: list, device) -> list:
    """The CONDITIONING with its tensors on `device` (the host's conds keep the prompt where the text
    encoder left it, usually the CPU, and copy it to the GPU at every model call)."""
    def moved(value):
        return value.to(device) if torch.is_tensor(value) else value

    return [[moved(tensor), {key: moved(value) for key, value in options.items()}] for tensor, options in conditioning]
