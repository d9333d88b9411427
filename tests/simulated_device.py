"""A second device on a CPU-only machine, so that tests catch tensors made on the wrong device.

On a GPU, an op that mixes a CUDA tensor with a CPU tensor of one or more dimensions fails
("Expected all tensors to be on the same device"); on a CPU-only machine every tensor is on the
CPU and such code passes. Under `SimulatedDevice()`, tensors moved with `on_device(t)` (or made
with `device=DEVICE`, or moved with `.to(x.device)` from one of them) report `DEVICE` as their
device and keep their values on the CPU; an op that mixes them with a CPU tensor of one or more
dimensions raises the same error as CUDA does. What CUDA allows stays allowed: 0-dim CPU tensors
(scalars) beside device tensors, copies between devices, and CPU index tensors. A CPU generator
used to draw on the device fails, as it does on CUDA.

`copies_from_cpu` counts the copies of CPU tensors onto the device: on CUDA each is a blocking copy
(`.to(device)` without pinned memory and non_blocking) that makes the CPU wait for the GPU to drain.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# The meta device stands in for the accelerator: a real device type whose tensors the mode backs
# with CPU storage; no code under test creates meta tensors on its own.
DEVICE = torch.device("meta")

_CROSS_DEVICE_OPS = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default}


class OnDevice(torch.Tensor):
    """A CPU tensor that reports DEVICE as its device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
                                                   dtype=elem.dtype, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a simulated-device tensor outside SimulatedDevice()")


def on_device(tensor: torch.Tensor) -> OnDevice:
    return OnDevice(tensor.detach().cpu())


def values(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU values of a simulated-device tensor (a plain CPU tensor is returned as it is)."""
    return tensor.elem if isinstance(tensor, OnDevice) else tensor


def _is_device(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class SimulatedDevice(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies_from_cpu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on_dev = any(isinstance(t, OnDevice) for t in tensors)
        to_device = _is_device(kwargs.get("device"))
        if func is torch.ops.aten._to_copy.default and to_device and not isinstance(args[0], OnDevice) or \
                func is torch.ops.aten.copy_.default and isinstance(args[0], OnDevice) and not isinstance(args[1], OnDevice):
            self.copies_from_cpu += 1
        if to_device:
            generator = kwargs.get("generator")
            if generator is not None and generator.device.type == "cpu":
                raise RuntimeError(f"{func}: a CPU generator cannot draw on the device (as on CUDA)")
            kwargs["device"] = torch.device("cpu")
        if on_dev and func not in _CROSS_DEVICE_OPS:
            for t in tensors:
                if isinstance(t, OnDevice) or t.dim() == 0:
                    continue
                if func in _INDEX_OPS and not t.is_floating_point():
                    continue
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{DEVICE} (simulated) and cpu! ({func}, a CPU tensor of shape {tuple(t.shape)})")
        args, kwargs = tree_map(values, (args, kwargs))
        out = func(*args, **kwargs)
        leaves_cpu = func is torch.ops.aten._to_copy.default and "device" in kwargs and not to_device
        if to_device or (on_dev and not leaves_cpu):
            return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t, out)
        return out
