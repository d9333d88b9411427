"""Where the pack's nodes write files: under the first folder the host lists for a kind, by a name
checked (fastgen_core.checkpoint.check_save_name) before any work is spent."""

from __future__ import annotations

import os

import folder_paths

from ...fastgen_core.checkpoint import check_save_name


def resolve_save_path(save_name: str, folder: str, example: str, allow_existing: bool, existing_hint: str) -> str:
    """The path `save_name` names under the host's first `folder` folder; refuses names that are not
    plain relative names, and an existing file unless `allow_existing` (`existing_hint` says what to
    do instead)."""
    name = check_save_name(save_name, example=example)
    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"save_name {save_name!r} leaves the {folder} folder")
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{name} in {root} is a folder or another non-file: choose another save_name")
    if os.path.exists(path) and not allow_existing:
        raise ValueError(f"{name} already exists in {root}: {existing_hint}")
    return path


def listed_name(path: str, folder: str) -> str:
    """A path under the host's first `folder` folder as the host's file lists name it (the name a
    loader's combo takes)."""
    return os.path.relpath(path, folder_paths.get_folder_paths(folder)[0]).replace(os.sep, "/")


def save_name_problem(save_name: str, example: str) -> str | bool:
    """For a node's validate_inputs: True, or what is wrong with the name (before the prompt runs).
    A linked name arrives as None here and is checked when the node runs."""
    if save_name is None:
        return True
    try:
        check_save_name(save_name, example=example)
    except ValueError as err:
        return str(err)
    return True


def shown_path(path: str) -> str:
    """A file the pack wrote, as messages show it: relative to the ComfyUI folder when inside it
    (models/unet/..., whichever folder the host's lists put first), else absolute."""
    base, path = os.path.abspath(folder_paths.base_path), os.path.abspath(path)
    try:
        inside = os.path.commonpath([base, path]) == base
    except ValueError:  # another drive (Windows)
        inside = False
    return (os.path.relpath(path, base) if inside else path).replace(os.sep, "/")
