"""fastgen_core must never import ComfyUI: it is the part that runs and is tested without a host."""

import ast
import os
import subprocess
import sys

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastgen_core")
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution",
                "latent_preview", "node_helpers"}


def test_no_module_in_fastgen_core_imports_the_host():
    offenders = []
    for root, _, files in os.walk(CORE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        mods = [node.module or ""]
                    else:
                        continue
                    offenders += [f"{path}:{node.lineno} {m}" for m in mods if m.split(".")[0] in HOST_MODULES]
    assert not offenders, offenders


def test_importing_every_core_module_loads_no_host_module():
    modules = [f"fastgen_core.{n[:-3]}" for n in os.listdir(CORE) if n.endswith(".py") and n != "__init__.py"]
    modules += [f"fastgen_core.{n}" for n in os.listdir(CORE) if os.path.isfile(os.path.join(CORE, n, "__init__.py"))]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {sorted(HOST_MODULES)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(CORE), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
