"""The node layer's shape: a node module (nodes/<feature>.py) is its schema and a short execute over
the host glue in nodes/host/ and the core; it never imports another node module, and the glue never
imports a node module (so each concept has one owner and no feature leans on another's node)."""

import ast
import os

NODES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nodes")
FEATURES = {n[:-3] for n in os.listdir(NODES) if n.endswith(".py") and n != "__init__.py"}


def _relative_imports(path: str):
    """(line, module names) of each relative import: `from .x import y` gives x; `from . import y` gives y."""
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module:
                yield node.lineno, node.level, [node.module.split(".")[0]]
            else:
                yield node.lineno, node.level, [a.name for a in node.names]


def test_no_node_module_imports_another_node_module():
    offenders = []
    for feature in sorted(FEATURES):
        path = os.path.join(NODES, feature + ".py")
        for line, level, names in _relative_imports(path):
            offenders += [f"nodes/{feature}.py:{line} imports nodes/{n}.py" for n in names if level == 1 and n in FEATURES]
    assert not offenders, offenders


def test_the_host_glue_imports_no_node_module():
    offenders = []
    host = os.path.join(NODES, "host")
    for name in sorted(os.listdir(host)):
        if name.endswith(".py"):
            for line, level, names in _relative_imports(os.path.join(host, name)):
                offenders += [f"nodes/host/{name}:{line} imports nodes/{n}.py" for n in names if level == 2 and n in FEATURES]
    assert not offenders, offenders
