"""FastGen World Session (#8) in the real host: queued from a client with an open websocket, frames
stream to that client only; actions, reset and stop go through the pack's routes; bad input and
floods get 4xx answers while the loop keeps running."""

import asyncio
import base64
import io
import json
import uuid

import numpy as np
import pytest
import torch


def session_prompt(model="tiny_world.safetensors", **settings):
    inputs = dict(model_name=model, world_seed=7, steps=0, window_frames=8, sink_frames=4, max_fps=60.0,
                  frames_per_step=1, idle_seconds=60, seed=0)
    inputs.update(settings)
    return {"1": {"class_type": "FastGenWorldSession", "inputs": inputs},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def decode(png_b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))


class Page:
    """A client as ComfyUI's page is one: a websocket under a client id, collecting events."""

    def __init__(self, comfy):
        self.comfy, self.client_id, self.events = comfy, uuid.uuid4().hex, []

    async def __aenter__(self):
        import aiohttp

        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"{self.comfy.url}/ws?clientId={self.client_id}")
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self):
        import aiohttp

        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.events.append(json.loads(msg.data))

    async def __aexit__(self, *exc):
        self.reader.cancel()
        await self.ws.close()
        await self.http.close()

    async def queue(self, prompt):
        mark = len(self.events)
        async with self.http.post(f"{self.comfy.url}/prompt", json={"prompt": prompt, "client_id": self.client_id}) as r:
            assert r.status == 200, await r.text()
        started = await self.wait_for(lambda e: e["type"] == "fastgen.world.started", after=mark)
        executed = await self.wait_for(lambda e: e["type"] == "executed" and "fastgen_world" in (e["data"].get("output") or {}),
                                       after=mark)
        assert "session" not in executed["data"]["output"]["fastgen_world"][0], "the token must not reach the history"
        return started

    async def wait_for(self, match, timeout=60.0, after=0):
        for _ in range(int(timeout / 0.05)):
            found = [e for e in self.events[after:] if match(e)]
            if found:
                return found[0]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching event in {timeout} s; got {[e['type'] for e in self.events][-20:]}")

    def frames(self, session):
        return [e["data"] for e in self.events if e["type"] == "fastgen.world.frames" and e["data"]["session"] == session]

    async def post(self, route, body):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with self.http.post(f"{self.comfy.url}{route}", data=data, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.text()


def test_session_streams_to_its_page_and_obeys_the_routes(comfy):
    async def play():
        async with Page(comfy) as page, Page(comfy) as other:
            info = (await page.queue(session_prompt()))["data"]
            token = info["session"]
            # no other client can learn the token: the shared history and queue never hold it
            assert token not in json.dumps(comfy.get("/history")) and token not in json.dumps(comfy.get("/queue"))
            assert info["actions"] == ["none", "up", "down", "left", "right", "jump"] and info["steps"] == 2
            await page.wait_for(lambda e: e["type"] == "fastgen.world.frames" and e["data"]["first"] >= 8)
            first = page.frames(token)[0]
            assert first["first"] == 0 and decode(first["frames"][0]).shape == (64, 64, 3)
            assert [f["first"] for f in page.frames(token)][:3] == [0, 4, 8], "chunks in order after the start view"

            assert (await page.post("/fastgen/world/action", {"session": token, "action": "left"}))[0] == 200
            status = json.loads((await page.post("/fastgen/world/action", {"session": token, "action": "jump"}))[1])["status"]
            assert status["running"] and status["action"] == "left"
            bad = [await page.post("/fastgen/world/action", body) for body in (
                {"session": token, "action": "fly"}, {"session": token}, "{not json", "[1, 2]", {"session": token, "action": "x" * 2000})]
            assert [code for code, _ in bad] == [400, 400, 400, 400, 413], bad
            assert "unknown action 'fly'" in bad[0][1]
            assert (await page.post("/fastgen/world/action", {"session": "guess", "action": "left"}))[0] == 404

            codes = [(await page.post("/fastgen/world/action", {"session": token, "action": "up"}))[0] for _ in range(200)]
            assert 429 in codes and codes[0] == 200, "a flood is refused"
            count = len(page.frames(token))
            await page.wait_for(lambda e: e["type"] == "fastgen.world.frames", after=len(page.events))
            assert len(page.frames(token)) > count, "the loop keeps running through bad input and floods"

            assert (await page.post("/fastgen/world/reset", {"session": token}))[0] in (200, 429)
            await asyncio.sleep(0.6)  # the rate limiter refills
            assert (await page.post("/fastgen/world/reset", {"session": token}))[0] == 200
            mark = len(page.events)
            await page.wait_for(lambda e: e["type"] == "fastgen.world.frames" and e["data"]["first"] == 0, after=mark)

            assert (await page.post("/fastgen/world/stop", {"session": token}))[0] == 200
            stopped = await page.wait_for(lambda e: e["type"] == "fastgen.world.stopped")
            assert stopped["data"]["status"]["stopped"] == "stopped from the page"
            assert (await page.post("/fastgen/world/action", {"session": token, "action": "left"}))[0] == 404
            assert not [e for e in other.events if e["type"].startswith("fastgen.world")], "frames leaked to another page"

    asyncio.run(play())


def test_queuing_again_replaces_the_pages_session_and_the_same_actions_give_the_same_frames(comfy):
    async def run_once(page, actions):
        info = (await page.queue(session_prompt(seed=5)))["data"]
        token = info["session"]
        for action in actions:
            await page.post("/fastgen/world/action", {"session": token, "action": action})
        await page.wait_for(lambda e: e["type"] == "fastgen.world.frames" and e["data"]["session"] == token
                            and e["data"]["first"] >= 12)
        return token

    async def play():
        async with Page(comfy) as page:
            first = await run_once(page, [])
            second = await run_once(page, [])
            assert first != second
            await page.wait_for(lambda e: e["type"] == "fastgen.world.stopped" and e["data"]["session"] == first)
            a = [decode(f) for d in page.frames(first)[:3] for f in d["frames"]]
            b = [decode(f) for d in page.frames(second)[:3] for f in d["frames"]]
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "same settings, same actions: same frames"
            await page.post("/fastgen/world/stop", {"session": second})

    asyncio.run(play())


@pytest.mark.parametrize("client_id", [None, "a-client-with-no-open-websocket"])
def test_without_a_page_the_node_says_so(comfy, client_id):
    status, body = comfy.post("/prompt", {"prompt": session_prompt(), **({"client_id": client_id} if client_id else {})})
    assert status == 200
    import time

    for _ in range(200):
        history = comfy.get(f"/history/{body['prompt_id']}")
        if body["prompt_id"] in history:
            break
        time.sleep(0.1)
    entry = history[body["prompt_id"]]
    assert entry["status"]["status_str"] == "error", "a session nobody can watch must not start"
    assert "queue it from ComfyUI's page" in json.dumps(entry["status"])


def artifacts_dir():
    import os

    path = os.environ.get("FASTGEN_TEST_ARTIFACTS") or os.path.join(os.path.dirname(__file__), "..", "..", "test-artifacts")
    os.makedirs(path, exist_ok=True)
    return path


KEY_CODES = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40, "KeyW": 87, "KeyA": 65, "KeyS": 83, "KeyD": 68}


def test_play_the_shipped_world_model_in_the_real_page(comfy):
    """The world_model_play workflow in headless Chromium: Queue, click the canvas, hold keys; the
    canvas takes the keyboard, the held key reaches the session, frames keep arriving and are drawn,
    and the frames the shipped model makes while a key is held move the view the way the key says
    (read off consecutive frames as the page received them)."""
    import os

    from browser import Browser, find_chromium, load_workflow_in_page, page_errors, queue_from_page

    from fastgen_core import data
    from fastgen_core import eval as eval_module

    if find_chromium() is None:
        pytest.skip("no Chromium for the page test (apt-get install chromium)")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    with open(os.path.join(root, "workflows", "world_model_play.json")) as f:
        workflow = json.load(f)
    node_js = "window.app.graph._nodes.find(n => n.type === 'FastGenWorldSession')"

    async def holding(browser, code):
        """Hold a key; what the session reported while it was held, and the frames drawn since."""
        key = code.removeprefix("Key").lower() if code.startswith("Key") else code
        params = dict(code=code, key=key, windowsVirtualKeyCode=KEY_CODES[code], nativeVirtualKeyCode=KEY_CODES[code])
        drawn = await browser.evaluate(f"{node_js}.fastgenWorld.framesDrawn")
        await browser.send("Input.dispatchKeyEvent", type="keyDown", **params)
        await asyncio.sleep(1.5)
        reported = await browser.evaluate(f"{node_js}.fastgenWorld.remote.action")
        await browser.send("Input.dispatchKeyEvent", type="keyUp", **params)
        await asyncio.sleep(1.0)
        released = await browser.evaluate(f"{node_js}.fastgenWorld.remote.action")
        return reported, released, await browser.evaluate(f"{node_js}.fastgenWorld.framesDrawn") - drawn

    comfy.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the graph
    comfy.post("/settings/Comfy.Minimap.Visible", False)

    async def play():
        browser = await Browser(width=1200, height=900).session()
        try:
            assert await load_workflow_in_page(browser, comfy.url, workflow) == []
            # keep every frames event the page receives, as the canvas does
            await browser.evaluate("(() => { window.__fastgenFrames = []; window.app.api.addEventListener("
                                   "'fastgen.world.frames', (e) => window.__fastgenFrames.push(e.detail)); return true; })()")
            await queue_from_page(browser, comfy)
            await browser.wait_for(f"{node_js}.fastgenWorld.session && {node_js}.fastgenWorld.framesDrawn > 12", timeout=60)
            # click the canvas where it is on screen, as a user does, so it takes the keyboard
            await browser.evaluate("window.app.extensionManager.command.execute('Comfy.Canvas.FitView').then(() => true)")
            await asyncio.sleep(0.5)
            box = await browser.evaluate(f"(() => {{ const r = {node_js}.fastgenWorld.canvas.getBoundingClientRect(); "
                                         "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
            for kind in ("mousePressed", "mouseReleased"):
                await browser.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
            focused = await browser.evaluate(f"document.activeElement === {node_js}.fastgenWorld.canvas")
            left = await holding(browser, "ArrowLeft")
            up = await holding(browser, "KeyW")
            await browser.screenshot(os.path.join(artifacts_dir(), "world_model_play.png"))
            fps = await browser.evaluate(f"{node_js}.fastgenWorld.fps")
            errors = await page_errors(browser)
            events = await browser.evaluate("window.__fastgenFrames.map(d => ({first: d.first, frames: d.frames, "
                                            "actions: d.status.chunk_actions || []}))")
            await browser.evaluate(f"{node_js}.fastgenWorld.send('stop').then(() => true)")
            await browser.wait_for(f"{node_js}.fastgenWorld.session === null", timeout=20)
            return focused, left, up, fps, errors, events
        finally:
            await browser.close()

    focused, left, up, fps, errors, events = asyncio.run(play())
    # every received frame by index, with the action it was made under
    frames = {}
    for event in events:
        for i, (png, action) in enumerate(zip(event["frames"], event["actions"], strict=False)):
            frames[event["first"] + i] = (torch.from_numpy(decode(png).copy()).permute(2, 0, 1).float() / 127.5 - 1, action)
    agreement = {}
    for name in ("left", "up"):
        moved = [eval_module.estimate_shift(frames[i - 1][0], frame) == data.view_shift(data.GAME_ACTIONS.index(name))
                 for i, (frame, action) in sorted(frames.items()) if action == name and i - 1 in frames]
        agreement[name] = (sum(moved), len(moved))
    assert focused, "a click on the canvas did not give it the keyboard"
    assert left[:2] == ("left", "none") and up[:2] == ("up", "none"), (left, up)
    assert left[2] >= 10 and up[2] >= 10, f"frames drawn while holding keys: {left[2]}, {up[2]}"
    assert fps > 5, f"the canvas drew {fps} frames in the last second"
    assert errors == [], errors
    for name, (agree, total) in agreement.items():
        assert total >= 8 and agree / total >= 0.5, f"holding {name}: the view moved that way in {agree} of {total} frames"


def test_a_world_model_whose_recipe_asks_for_huge_chunks_is_refused_at_once(comfy):
    """chunk_frames comes from the file's recipe, and the session renders that many frames before
    its first chunk: a file asking for ten million is refused in well under a second."""
    import os
    import time

    from fastgen_core import checkpoint, networks, train

    net = networks.CausalWorldDiT(networks.CausalWorldDiTConfig(dim=32, depth=1, heads=2)).init_weights(3)
    path = os.path.join(comfy.base, "models", "diffusion_models", "huge_chunks_world.safetensors")
    checkpoint.save_network(path, net, train.world_recipe(steps=2, chunk_frames=10**7))

    async def queue():
        async with Page(comfy) as page:
            start = time.monotonic()
            async with page.http.post(f"{comfy.url}/prompt", json={"prompt": session_prompt("huge_chunks_world.safetensors"),
                                                                    "client_id": page.client_id}) as r:
                assert r.status == 200, await r.text()
            error = await page.wait_for(lambda e: e["type"] == "execution_error", timeout=30)
            return error["data"]["exception_message"], time.monotonic() - start

    message, seconds = asyncio.run(queue())
    assert "huge_chunks_world.safetensors: its recipe's chunk_frames 10000000 is not a frame count in 1..64" in message
    assert seconds < 5, seconds
