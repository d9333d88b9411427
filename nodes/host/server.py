"""The running host's PromptServer."""

from __future__ import annotations


def prompt_server():
    """The running host's PromptServer, or None where the pack is imported without one (tools that
    load the node classes only): then there are no routes and the node says so."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)
