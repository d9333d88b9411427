"""Host objects whose own CPU tensors are copied to the GPU at every call.

The host's Wan latent formats keep their per-channel mean and std on the CPU and copy them to the
latent's device in every `process_in` / `process_out`. On CUDA that copy (pageable memory, not
non_blocking) waits until the GPU has finished everything queued, so the CPU cannot run ahead of
it; with the tensors already on the device the host's `.to(device, dtype)` is a no-op and gives
the same values.
"""

from __future__ import annotations

import contextlib

import torch


def tensor_attributes_to(obj, device) -> dict:
    """Moves `obj`'s tensor attributes to `device`; returns what they were (to restore them)."""
    previous = {name: value for name, value in vars(obj).items() if torch.is_tensor(value)}
    for name, value in previous.items():
        setattr(obj, name, value.to(device))
    return previous


@contextlib.contextmanager
def tensor_attributes_on(obj, device):
    """`obj`'s tensor attributes on `device` while inside, its own ones again afterwards."""
    previous = tensor_attributes_to(obj, device)
    try:
        yield obj
    finally:
        for name, value in previous.items():
            setattr(obj, name, value)
