"""fastgen_core: the host-free PyTorch library behind FastGen for ComfyUI.

It never imports ComfyUI (a test enforces this): nodes/ translates the host's objects into plain
tensors and callables and calls in here. One module per capability; see README.md for the map.
"""
