"""Widget values checked against the node's own schema, where this host does not check them.

ComfyUI v0.3.64 checks a V1 combo's value against its list, but a V3 `io.Combo` reaches its
validation as the type "COMBO" with no list, so any string sent through the API gets through. It
also skips the min / max of every input a node's `validate_inputs` names (and of all of them when
it takes **kwargs). A node's `validate_inputs` names the inputs it wants checked and passes their
values here; linked inputs arrive as None and are checked where they are used.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

MAX_LISTED = 60  # choices named in a message (file lists can be long)


def choices_text(options) -> str:
    shown = ", ".join(str(o) for o in options[:MAX_LISTED])
    return shown + (f", ... ({len(options)} in all)" if len(options) > MAX_LISTED else "")


def widget_problem(cls, **values) -> str | None:
    """What is wrong with these values by `cls`'s schema (a choice not offered, a number out of
    range or not finite), or None."""
    declared = {item.id: item for item in cls.define_schema().inputs}
    for name, value in values.items():
        item = declared[name]
        if value is None:
            continue
        if isinstance(item, io.Combo.Input) and value not in item.options:
            return f"the node's {name} input {value!r} is not one of its choices: {choices_text(item.options)}"
        if isinstance(item, (io.Int.Input, io.Float.Input)):
            if not math.isfinite(value):
                return f"the node's {name} input is {value}: give a finite number"
            if item.min is not None and value < item.min:
                return f"the node's {name} input {value} is below its minimum {item.min}"
            if item.max is not None and value > item.max:
                return f"the node's {name} input {value} is above its maximum {item.max}"
    return None
