"""FastGen network files: safetensors with the architecture and the recipe in the metadata.

    fastgen.network = {"arch": "DigitDiT", "config": {...}}   which class to build, with what sizes
    fastgen.recipe  = {...}                                    how to sample it (recipe.Recipe)

Writes are atomic (`files.atomic_path`), so an interrupted save never leaves a half-written file
under the final name. Loading reads only safetensors: no pickle.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .files import atomic_path, read_metadata
from .recipe import RECIPE_KEY, Recipe

NETWORK_KEY = "fastgen.network"


def _architectures():
    # Imported lazily so that reading metadata never builds a network module graph.
    from . import eval as eval_module
    from . import networks

    return {
        "DigitDiT": (networks.DigitDiT, networks.DigitDiTConfig),
        "CausalWorldDiT": (networks.CausalWorldDiT, networks.CausalWorldDiTConfig),
        "DigitClassifier": (eval_module.DigitClassifier, eval_module.DigitClassifierConfig),
    }


MAX_NAME_BYTES = 255  # one path component on common file systems
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def check_save_name(save_name: str, suffix: str = ".safetensors", example: str = "fastgen/my_model") -> str:
    """A user's save name as a relative path ending in `suffix`, or a ValueError saying what is
    wrong with it, before any work is spent: no absolute path, drive (`C:`), `..` / `.` or empty
    component, hidden component (the pack's temporary files start with '.'), control character,
    Windows device name, or component longer than the file system allows."""
    name = save_name.strip().replace("\\", "/")
    if not name.endswith(suffix):
        name += suffix
    hint = f"a relative name like '{example}'"
    if not save_name.strip():
        raise ValueError(f"save_name is empty: give {hint}")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise ValueError(f"save_name {save_name!r} contains a control character: give {hint}")
    if name.startswith("/") or ":" in name:
        raise ValueError(f"save_name {save_name!r} is an absolute path or names a drive: give {hint}")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"save_name {save_name!r} has an empty, '.' or '..' part: give {hint}")
        if part.startswith("."):
            raise ValueError(f"save_name {save_name!r}: the part {part!r} starts with '.' (hidden): give {hint}")
        if part.split(".")[0].lower() in _RESERVED:
            raise ValueError(f"save_name {save_name!r}: {part!r} is a reserved device name on Windows: give {hint}")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"save_name {save_name!r}: the part {part[:40]!r}... is {len(part.encode())} bytes long, "
                             f"at most {MAX_NAME_BYTES} with {suffix!r}: give a shorter name")
    return name


def save_network(path: str, net: torch.nn.Module, recipe: Recipe | None = None, dtype=torch.float16, extra_metadata=None):
    arch = type(net).__name__
    if arch not in _architectures():
        raise ValueError(f"cannot save {arch}: not a FastGen network architecture")
    metadata = {NETWORK_KEY: json.dumps({"arch": arch, "config": net.config.to_dict()}, sort_keys=True)}
    if recipe is not None:
        metadata[RECIPE_KEY] = recipe.to_json()
    metadata.update(extra_metadata or {})
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def network_info(path: str) -> tuple[str, dict, Recipe | None]:
    """(arch, config dict, recipe or None) from a FastGen file's metadata."""
    metadata = read_metadata(path)
    if NETWORK_KEY not in metadata:
        raise ValueError(
            f"{path} is a safetensors file but not a FastGen network (no '{NETWORK_KEY}' metadata). "
            "Load other diffusion models with the host's own loaders (Load Diffusion Model, Load LoRA)."
        )
    try:
        info = json.loads(metadata[NETWORK_KEY])
        arch, config = info["arch"], info["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{path}: malformed '{NETWORK_KEY}' metadata") from None
    recipe = Recipe.from_json(metadata[RECIPE_KEY], source=path) if RECIPE_KEY in metadata else None
    return arch, config, recipe


def build_network(arch: str, config: dict, source: str = "network", **kwargs) -> torch.nn.Module:
    archs = _architectures()
    if arch not in archs:
        raise ValueError(f"{source}: unknown FastGen architecture {arch!r} (known: {sorted(archs)})")
    cls, config_cls = archs[arch]
    try:
        return cls(config_cls.from_dict(config), **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: bad {arch} config: {err}") from None


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    read_metadata(path)  # clear errors for missing / non-safetensors files
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read tensors (corrupt or truncated?): {err}") from None


# State a network holds beyond its file's tensors (non-persistent buffers such as position tables):
# sizes from metadata alone must not make the process allocate more than this.
MAX_EXTRA_BYTES = 256 * 2**20


def check_shapes(expected: dict[str, tuple], found: dict[str, tuple], source: str):
    """The file's tensor names and shapes against the architecture's, before anything is built."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, shape in found.items():
        if tuple(shape) != tuple(expected[key]):
            raise ValueError(f"{source}: {key} has shape {list(shape)}, expected {list(expected[key])}")


def check_state_dict(net: torch.nn.Module, state_dict: dict, source: str):
    check_shapes({k: tuple(v.shape) for k, v in net.state_dict().items()}, {k: tuple(v.shape) for k, v in state_dict.items()},
                 source)
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: {key} contains NaN or inf")


def header_shapes(path: str) -> dict[str, tuple]:
    """Tensor names and shapes from a safetensors header (no tensor is read)."""
    read_metadata(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the tensor header (corrupt or truncated?): {err}") from None


def check_file_fits(arch: str, config: dict, path: str):
    """Refuse a file whose metadata describes another network than its tensors before building it:
    the sizes in the metadata are the file's word, the tensors are what it holds. The network is
    built on the meta device (no memory) and compared name by name and shape by shape."""
    with torch.device("meta"):
        skeleton = build_network(arch, config, source=path)
    expected = skeleton.state_dict()
    check_shapes({k: tuple(v.shape) for k, v in expected.items()}, header_shapes(path), path)
    extra = sum(b.numel() * b.element_size() for name, b in skeleton.named_buffers() if name not in expected)
    if extra > MAX_EXTRA_BYTES:
        raise ValueError(f"{path}: its config asks for {extra / 2**20:.0f} MiB of state beyond its weights "
                         f"(at most {MAX_EXTRA_BYTES // 2**20} MiB): refused")


def load_network(path: str, dtype=torch.float32, device="cpu") -> tuple[torch.nn.Module, Recipe | None]:
    """Build the network a FastGen file describes and load its weights (eval mode). The metadata's
    sizes are checked against the file's tensors before the network is built."""
    arch, config, recipe = network_info(path)
    check_file_fits(arch, config, path)
    net = build_network(arch, config, source=path)
    state_dict = load_state_dict(path)
    check_state_dict(net, state_dict, path)
    net.load_state_dict(state_dict)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False), recipe
