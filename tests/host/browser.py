"""Headless Chromium driven over the DevTools protocol (aiohttp websocket; no extra packages):
open ComfyUI's page, load a workflow the way a user's drag-and-drop does, read the page's state,
take screenshots. Debian's `chromium` package provides the browser."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--hide-scrollbars",
]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Browser:
    def __init__(self, width=1400, height=800):
        self.binary = find_chromium()
        if self.binary is None:
            raise FileNotFoundError("no Chromium: apt-get install chromium")
        self.profile = tempfile.mkdtemp(prefix="fastgen-chromium-")
        self.port = 9222 + os.getpid() % 1000
        self.proc = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)

    def _page_ws_url(self, timeout=30.0) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError("Chromium's DevTools endpoint did not come up")

    async def session(self):
        import aiohttp

        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(self._page_ws_url(), max_msg_size=0)
        return self

    async def send(self, method: str, **params):
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async for msg in self._ws:
            data = json.loads(msg.data)
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
        raise ConnectionError("DevTools socket closed")

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if await self.evaluate(expression):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.25)
        raise TimeoutError(f"page never satisfied: {expression}")

    async def screenshot(self, path: str):
        data = (await self.send("Page.captureScreenshot", format="png"))["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    async def close(self):
        await self._ws.close()
        await self._http.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_ERROR_HOOK = """
window.__fastgenErrors = [];
window.addEventListener('error', e => window.__fastgenErrors.push(String(e.error?.stack || e.message)));
window.addEventListener('unhandledrejection', e => window.__fastgenErrors.push(String(e.reason?.stack || e.reason)));
const __consoleError = console.error;
console.error = (...args) => {
  window.__fastgenErrors.push(args.map(a => String(a?.stack || a)).join(' '));
  __consoleError(...args);
};
"""


async def page_errors(browser: Browser) -> list[str]:
    """Errors the page reported since it loaded (uncaught exceptions, rejections, console.error)."""
    return await browser.evaluate("window.__fastgenErrors || []")


async def load_workflow_in_page(browser: Browser, comfy_url: str, workflow: dict):
    """Open the ComfyUI page and load a UI-format workflow as drag-and-drop does (app.loadGraphData).
    Returns the node types the page could not resolve (shown as missing nodes)."""
    await browser.send("Page.enable")
    # collect the page's uncaught errors and console.error calls from the first script on
    await browser.send("Page.addScriptToEvaluateOnNewDocument", source=PAGE_ERROR_HOOK)
    await browser.send("Page.navigate", url=comfy_url)
    await browser.wait_for("window.app && window.app.graph && document.querySelector('canvas') !== null", timeout=90)
    # The frontend of v0.3.64 throws one TypeError of its own while registering its settings
    # (Comfy.Canvas.NavigationMode's onChange sets settings not registered yet): from start-up,
    # keep only errors raised in extensions' code; from here on, keep every error.
    await browser.evaluate("window.__fastgenErrors = (window.__fastgenErrors || []).filter(e => e.includes('/extensions/'))")
    # window.app is set before the page restores the previous session's workflow (an await later in
    # GraphView's start-up), and that restore can replace a graph loaded in between (seen in CI: 0
    # nodes). Load, let start-up settle, and load again until the page keeps the workflow's nodes.
    expected = len(workflow.get("nodes", []))
    for _attempt in range(4):
        await browser.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}).then(() => true)")
        await asyncio.sleep(1.0)
        counts = []
        for _check in range(2):
            counts.append(await browser.evaluate("window.app.graph._nodes.length"))
            await asyncio.sleep(0.5)
        if counts == [expected, expected]:
            break
    return await browser.evaluate(
        "window.app.graph._nodes.filter(n => n.has_errors || !LiteGraph.registered_node_types[n.type]).map(n => n.type)"
    )


async def queue_from_page(browser: Browser, server, timeout=120.0):
    """Press Run the way a user does (app.queuePrompt) and wait until the server's queue is empty."""
    await browser.evaluate("window.app.queuePrompt(0, 1).then(() => true)")
    deadline = time.time() + timeout
    await asyncio.sleep(0.5)
    while time.time() < deadline:
        queue = server.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            await asyncio.sleep(1.0)  # let the page draw the results
            return
        await asyncio.sleep(0.25)
    raise TimeoutError("the queued workflow did not finish")


async def fit_view(browser: Browser):
    await browser.evaluate("window.app.extensionManager.command.execute('Comfy.Canvas.FitView').then(() => true)")
    await asyncio.sleep(0.5)
