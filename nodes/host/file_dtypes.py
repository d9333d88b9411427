"""The dtypes a model's weights had in the file it was loaded from.

The host holds weights in the dtype it computes in (float32 on a CPU whatever the file held), so a
file written from a loaded model would grow: an fp16 model saved back with its untouched layers in
float32. Loaders that see the file's tensors remember their dtypes on the BaseModel (one object
shared by every clone of the MODEL), and writers store the weights back in them.
"""

from __future__ import annotations

from collections import Counter

import torch

ATTRIBUTE = "fastgen_file_dtypes"


def of(state_dict: dict, prefix: str = "") -> dict[str, torch.dtype]:
    """{diffusion-model key: dtype} of a file's floating tensors (keys without `prefix`); read it
    before the host loads the state dict, which empties it."""
    return {k[len(prefix):]: v.dtype for k, v in state_dict.items() if k.startswith(prefix) and v.is_floating_point()}


def remember(base_model, dtypes: dict[str, torch.dtype]):
    setattr(base_model, ATTRIBUTE, dtypes)


def as_loaded(base_model, state_dict: dict, keep=()) -> tuple[dict, str]:
    """The state dict with each floating tensor not in `keep` in the dtype it came in (a key the
    file did not have, e.g. converted by the host, takes the file's most common dtype), and what
    was done, as text. Without a record (a model from another pack's or the host's loader) the
    tensors stay as the host holds them."""
    dtypes = getattr(base_model, ATTRIBUTE, None)
    if not dtypes:
        held = sorted({str(v.dtype).removeprefix("torch.") for k, v in state_dict.items() if k not in keep and v.is_floating_point()})
        return state_dict, f"as this host holds them ({'/'.join(held)}: the file's own dtypes are known for models from FastGen loaders)"
    common = Counter(dtypes.values()).most_common(1)[0][0]
    out = {k: v.to(dtypes.get(k, common)) if k not in keep and v.is_floating_point() else v for k, v in state_dict.items()}
    stored = sorted({str(v.dtype).removeprefix("torch.") for k, v in out.items() if k not in keep and v.is_floating_point()})
    return out, f"in the dtype they came in ({'/'.join(stored)})"
