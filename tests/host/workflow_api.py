"""Convert a UI-format workflow (what users drag in) to the API prompt the server runs, the way the
frontend does: links become [source id, slot]; widget values are matched to the node's inputs in
the order `/object_info` lists them, skipping the extra "control after generate" value that seed
widgets carry."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def _is_widget(spec) -> bool:
    type_ = spec[0]
    return isinstance(type_, list) or type_ in WIDGET_TYPES


def missing_node_types(workflow: dict, object_info: dict) -> list[str]:
    return sorted({n["type"] for n in workflow["nodes"] if n["type"] not in UI_ONLY_NODES and n["type"] not in object_info})


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    missing = missing_node_types(workflow, object_info)
    if missing:
        raise ValueError(f"workflow uses node types the host does not have: {missing}")
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        linked = {inp["name"]: inp["link"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                widget = _is_widget(spec)
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
                    if widget:  # a widget converted to an input still holds its slot in widgets_values
                        values.pop(0) if values else None
                elif widget and values:
                    inputs[name] = values.pop(0)
                if widget and len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
                    values.pop(0) if values else None
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
