"""FastGen for ComfyUI: few-step samplers, distilled-student loaders, quantize / cache patches, a
causal world-model loop and DMD training, as native ComfyUI nodes.

ComfyUI imports this file from custom_nodes/<pack>/. The core library (fastgen_core) never imports
the host; the node layer (nodes/) does, so it is imported only when the host is present.
"""

WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # imported outside ComfyUI (e.g. by pytest collecting the repo): no nodes
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES

    class FastGenExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> FastGenExtension:
        return FastGenExtension()
