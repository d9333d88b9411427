"""A real ComfyUI for the host tests: found, started headless on CPU with this pack installed,
driven over its HTTP API, and stopped.

Where is ComfyUI? `COMFYUI_PATH`, else the host this pack sits in (custom_nodes/<pack>/../..).
Without one, or without its Python requirements, the host tests skip with a one-line reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_NAME = "comfyui-fastgen"
HOST_MODULES = ("aiohttp", "torchsde", "einops", "transformers", "yaml", "PIL", "sqlalchemy", "alembic", "av")


def find_comfyui() -> tuple[str | None, str]:
    """(path, reason): the path is None when no usable host is found, and the reason says why."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(os.environ["COMFYUI_PATH"])
    candidates.append(os.path.dirname(os.path.dirname(REPO)))  # custom_nodes/<pack>/../..
    for path in candidates:
        if os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy")):
            missing = [m for m in HOST_MODULES if importlib.util.find_spec(m) is None]
            if missing:
                return None, f"ComfyUI found at {path} but its requirements are missing here ({', '.join(missing)})"
            return path, ""
    if os.environ.get("COMFYUI_PATH"):
        return None, f"COMFYUI_PATH={os.environ['COMFYUI_PATH']} is not a ComfyUI checkout (no main.py / comfy/)"
    return None, "no ComfyUI: set COMFYUI_PATH to a ComfyUI checkout (v0.3.64) to run the host tests"


def import_host_in_process(importer):
    """`importer()`'s result, run with the host on sys.path and set up for the CPU, in this
    process (no server); the test is skipped, saying why, without a host or where its modules do
    not import. The host leaves sys.path afterwards: its top-level modules (nodes, utils, server)
    must not shadow others."""
    import pytest

    path, reason = find_comfyui()
    if path is None:
        pytest.skip(reason)
    sys.path.insert(0, path)
    # as in launch_comfyui.py: the index's CUDA torchvision beside the CPU torch fails on this module
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probe
        return importer()
    except Exception as error:  # a host that cannot import these modules here (missing optional packages)
        pytest.skip(f"the host's modules do not import in-process: {error}")
    finally:
        sys.path.remove(path)


def load_repo_module(name: str, *parts: str):
    """A file of this repo as a module, by path (the pack's own __init__ wants the full host)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, *parts))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI on 127.0.0.1 with a throwaway base directory holding models/, custom_nodes/ (this
    pack, linked), input/, output/, temp/ and user/."""

    def __init__(self, comfy_path: str, extra_models: dict[str, list[str]] | None = None, env: dict[str, str] | None = None):
        self.comfy_path = comfy_path
        self.env = dict(env or {})  # extra environment for the server process (e.g. HF_HUB_CACHE / HF_HUB_OFFLINE)
        self.base = tempfile.mkdtemp(prefix="fastgen-host-")
        for sub in ("custom_nodes", "input", "output", "temp", "user", "models/diffusion_models", "models/loras", "models/vae"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        os.symlink(REPO, os.path.join(self.base, "custom_nodes", PACK_NAME))
        # test-only nodes (a text encoder's CONDITIONING for tiny models), never part of the pack
        os.symlink(os.path.join(REPO, "tests", "host", "test_nodes"), os.path.join(self.base, "custom_nodes", "fastgen_test_nodes"))
        for folder, files in (extra_models or {}).items():
            os.makedirs(os.path.join(self.base, "models", folder), exist_ok=True)
            for f in files:
                shutil.copy(f, os.path.join(self.base, "models", folder))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "comfyui.log")
        self.proc = None

    def start(self, timeout: float = 120.0):
        cmd = [
            sys.executable, os.path.join(REPO, "tests", "host", "launch_comfyui.py"), self.comfy_path,
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", self.base,
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes",
            "--preview-method", "latent2rgb",
        ]
        self._log = open(self.log_path, "w")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route: str, payload):
        """POST JSON; returns (status, body as JSON where it is JSON, else text)."""
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def run_prompt(self, prompt: dict, timeout: float = 300.0, client_id: str | None = None) -> dict:
        """Queue an API-format prompt, wait for it, return its history entry (raises on errors)."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise AssertionError(f"prompt rejected ({status}): {json.dumps(body)[:2000]}")
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("status_str") == "error":
                    raise AssertionError(f"prompt failed: {self._error_summary(entry)}")
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run_prompt_from_page(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Run a prompt with a page's websocket open while it runs (as a user queues it), closed as
        soon as it is done; returns the history entry."""
        import asyncio

        import aiohttp

        async def run():
            client_id = uuid.uuid4().hex
            async with aiohttp.ClientSession() as http, http.ws_connect(f"{self.url}/ws?clientId={client_id}"):
                return await asyncio.get_running_loop().run_in_executor(None, lambda: self.run_prompt(prompt, timeout, client_id))

        return asyncio.run(run())

    def run_prompt_watching(self, prompt: dict, timeout: float = 300.0) -> tuple[dict, list, int]:
        """Run a prompt while listening on the websocket as the page does: returns the history
        entry, the JSON events received and the number of binary preview frames."""
        import asyncio

        import aiohttp

        async def watch():
            client_id = uuid.uuid4().hex
            events, previews = [], 0
            async with aiohttp.ClientSession() as http, http.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                loop = asyncio.get_running_loop()
                run = loop.run_in_executor(None, lambda: self.run_prompt(prompt, timeout, client_id))
                quiet_after_done = 0
                while quiet_after_done < 2:  # until the run is done and the socket has gone quiet (1 s)
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        quiet_after_done = quiet_after_done + 1 if run.done() else 0
                        continue
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        previews += 1
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        events.append(json.loads(msg.data))
                    else:
                        break
                return await run, events, previews

        return asyncio.run(watch())

    @staticmethod
    def _error_summary(entry: dict) -> str:
        """The failing node, the exception and the innermost frames of its traceback."""
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                frames = "".join(data.get("traceback", [])[-4:])
                return f"{data['node_type']} (node {data['node_id']}): {data['exception_type']}: {data['exception_message']}\n{frames}"
        return json.dumps(entry.get("status"))[:3000]

    def output_files(self, entry: dict) -> list[str]:
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for image in node_out.get("images", []) + node_out.get("latents", []):
                folder = {"output": "output", "temp": "temp"}[image.get("type", "output")]
                paths.append(os.path.join(self.base, folder, image.get("subfolder", ""), image["filename"]))
        return paths


def import_pack_module(dotted: str):
    """A module of this pack (e.g. "nodes.sampling") imported in this process under a stand-in
    package, without the pack's __init__ (which registers every node and wants a running server).
    Call it inside `import_host_in_process`."""
    import importlib

    for name, path in (("fgpack", REPO), ("fgpack.nodes", os.path.join(REPO, "nodes")),
                       ("fgpack.nodes.host", os.path.join(REPO, "nodes", "host"))):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return importlib.import_module(f"fgpack.{dotted}")
