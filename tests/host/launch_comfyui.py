"""Start ComfyUI's main.py in this Python, after one CPU workaround.

The index's torchvision wheel is a CUDA build; beside a CPU torch its meta registrations fail with
"operator torchvision::nms does not exist". ComfyUI imports torchvision at start (comfy/sd.py), and
no code path we run needs those registrations, so we stub that one module.

    python launch_comfyui.py COMFYUI_PATH [main.py arguments...]
"""

import os
import runpy
import sys
import types

comfy_path = os.path.abspath(sys.argv[1])
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.argv = [os.path.join(comfy_path, "main.py")] + sys.argv[2:]
sys.path.insert(0, comfy_path)
os.chdir(comfy_path)
runpy.run_path(sys.argv[0], run_name="__main__")
