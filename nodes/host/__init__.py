"""Host-model specifics: how our networks and the host's architectures meet ComfyUI's internals."""
