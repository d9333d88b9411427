"""FastGen World Session: play the embedded game world model live in ComfyUI's page.

Queue the node and it starts a `fastgen_core.session.WorldSession` (a bounded background loop)
for the page that queued it, then returns at once. Frames go to that page only, over the host's
websocket (event `fastgen.world.frames`); the page's canvas (web/js/world_session.js) sends the
keyboard's actions back through the routes below. A session is reachable only with its token,
which only the queuing page receives.

Routes (JSON bodies; answers are JSON with `error` on failure):
    POST /fastgen/world/action  {"session": token, "action": "left"}   400 bad input, 404 no such
                                                                        session, 429 too fast
    POST /fastgen/world/reset   {"session": token}
    POST /fastgen/world/stop    {"session": token}
    GET  /fastgen/world/status?session=token
"""

from __future__ import annotations

import base64
import io as bytes_io
import json
import logging
import os
import secrets
import threading
import time

import numpy as np
import torch
from aiohttp import web
from comfy_api.latest import io
from PIL import Image

from ..fastgen_core import checkpoint, data, world
from ..fastgen_core.session import RateLimiter, WorldSession
from .host import inputs
from .host.model_files import embedded_models, resolve_model_path, user_models
from .host.server import prompt_server

ARCH = "CausalWorldDiT"
MAX_SESSIONS = 4  # whole server: each session holds a CPU/GPU worker
MAX_BODY_BYTES = 1024
ACTION_RATE, ACTION_BURST = 60.0, 120  # a key repeat runs at ~30/s; more than this is a flood
FRAME_EVENT = "fastgen.world.frames"
STOPPED_EVENT = "fastgen.world.stopped"
STARTED_EVENT = "fastgen.world.started"  # carries the session token, to the queuing page only
log = logging.getLogger("FastGen")


class Sessions:
    """The running sessions: one per page (client id), at most MAX_SESSIONS on the server."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_token: dict[str, tuple[WorldSession, str, RateLimiter]] = {}

    def add(self, live: WorldSession, client_id: str) -> str:
        with self.lock:
            for token, (old, owner, _) in list(self.by_token.items()):
                if owner == client_id:  # a page runs one session: queuing again replaces it
                    old.stop("replaced by a new session", wait=0)
                    del self.by_token[token]
            running = [s for s, _, _ in self.by_token.values() if s.running]
            if len(running) >= MAX_SESSIONS:
                raise RuntimeError(f"{MAX_SESSIONS} world sessions are running on this server already; stop one "
                                   "(its Stop button) or wait until an idle one stops")
            token = secrets.token_urlsafe(16)
            self.by_token[token] = (live, client_id, RateLimiter(ACTION_RATE, ACTION_BURST))
        return token

    def get(self, token) -> tuple[WorldSession, str, RateLimiter] | None:
        with self.lock:
            return self.by_token.get(token) if isinstance(token, str) else None

    def forget(self, live: WorldSession):
        with self.lock:
            for token, (s, _, _) in list(self.by_token.items()):
                if s is live:
                    del self.by_token[token]


SESSIONS = Sessions()


_models: dict[tuple[str, float], object] = {}


DEFAULT_WORLD_MODEL = "embedded/game_world_student.safetensors"


def world_models() -> list[str]:
    return embedded_models(ARCH) + user_models(ARCH)


def load_world_model(name: str):
    path = resolve_model_path(name)
    key = (path, os.path.getmtime(path))
    if key not in _models:
        arch, _, _ = checkpoint.network_info(path)
        if arch != ARCH:
            raise ValueError(f"{name} is a {arch}, not a world model ({ARCH})")
        _models.clear()  # keep one: switching models frees the last
        _models[key] = checkpoint.load_network(path)
    return _models[key]


def start_view(world_seed: int, frames: int):
    """The first `frames` frames of the game world `world_seed`, the player standing still."""
    game = data.Game(world_seed)
    shown = [game.step(0) for _ in range(frames)]
    return torch.stack(shown, dim=1)[None], torch.zeros(1, frames, dtype=torch.long)


def encode_png(frame) -> str:
    """[C, H, W] in -1..1 -> base64 PNG."""
    pixels = ((frame.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buffer = bytes_io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class FastGenWorldSession(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FastGenWorldSession",
            display_name="FastGen World Session (play)",
            category="FastGen/world",
            description="Plays the embedded game world model live on this node: Queue, click the canvas, steer with "
            "WASD / arrow keys, Space to jump. Each chunk of frames is generated in a few steps from the frames "
            "before it and your keys (a causal video model with a rolling KV cache).",
            is_output_node=True,
            inputs=[
                io.Combo.Input("model_name", options=world_models(), default=DEFAULT_WORLD_MODEL,
                               tooltip="A FastGen world model: embedded/… ships with the pack (game_world_student: "
                               "2 steps per chunk, self-forcing DMD; game_world_model: its 4-step teacher); your own "
                               "trained ones in models/diffusion_models appear too."),
                io.Int.Input("world_seed", default=1000, min=0, max=2**31 - 1,
                             tooltip="Which game world the session starts in (its first frames come from the game's "
                             "renderer; the model imagines everything after)."),
                io.Int.Input("steps", default=0, min=0, max=32,
                             tooltip="Denoising steps per chunk; 0 = the model's recipe."),
                io.Int.Input("window_frames", default=12, min=1, max=256,
                             tooltip="Recent frames the model attends to (rolling KV cache)."),
                io.Int.Input("sink_frames", default=4, min=0, max=64,
                             tooltip="The first frames, kept in the cache for good (an anchor for long sessions)."),
                io.Float.Input("max_fps", default=30.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Frames per second sent to the page; generation waits rather than run ahead."),
                io.Int.Input("frames_per_step", default=2, min=1, max=8,
                             tooltip="Walking pace: a held key moves the agent one tile (8 px) every this many frames "
                             "(at 30 FPS, 2 = 15 tiles a second)."),
                io.Int.Input("idle_seconds", default=120, min=5, max=3600,
                             tooltip="The session stops by itself after this long without a key press."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Noise seed of the generation (the same seed and keys give the same frames)."),
            ],
            outputs=[io.Image.Output(display_name="start_view", tooltip="The first frames the session starts from.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, max_fps: float = 30.0):
        return inputs.widget_problem(cls, max_fps=max_fps) or True

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return time.time()  # every Queue (re)starts the session, even with the same settings

    @classmethod
    def execute(cls, model_name, world_seed, steps, window_frames, sink_frames, max_fps, frames_per_step, idle_seconds,
                seed) -> io.NodeOutput:
        server = prompt_server()
        if server is None:
            raise RuntimeError("FastGen World Session needs ComfyUI's server (its websocket and routes)")
        client_id = server.client_id
        if not client_id or client_id not in server.sockets:
            raise ValueError("FastGen World Session streams to the page that queued it: queue it from ComfyUI's page "
                             "(an API call needs a client_id with an open websocket; this one has none)")
        net, recipe = load_world_model(model_name)
        net.eval()
        chunk = world.recipe_chunk_frames(recipe, model_name)
        schedule = world.ChunkSchedule.for_recipe(recipe, steps)
        steps = len(schedule.later) - 1
        sampler = recipe.multistep_noise() if recipe else "sde"
        frames, actions = start_view(world_seed, chunk)
        node_id = cls.hidden.unique_id
        holder = {}

        def push(chunk_frames, first, status):
            if client_id not in server.sockets:  # the page closed: nobody is playing
                holder["session"].stop("page closed", wait=0)
                return
            server.send_sync(FRAME_EVENT, {"session": holder["token"], "node": node_id, "first": first,
                                           "frames": [encode_png(f) for f in chunk_frames], "status": status}, client_id)

        def stopped(session):
            SESSIONS.forget(session)
            server.send_sync(STOPPED_EVENT, {"session": holder.get("token"), "node": node_id, "status": session.status()},
                             client_id)
            log.info("FastGen world session of %s stopped: %s", client_id, session.stop_reason)

        live = WorldSession(net, (frames, actions), push, data.GAME_ACTIONS, chunk_frames=chunk,
                            sampler=sampler, window_frames=window_frames, sink_frames=sink_frames, max_fps=max_fps,
                            idle_seconds=idle_seconds, seed=seed, on_stop=stopped, schedule=schedule,
                            frames_per_step=frames_per_step)
        holder["session"] = live
        holder["token"] = SESSIONS.add(live, client_id)
        info = {"actions": list(data.GAME_ACTIONS), "max_fps": max_fps, "chunk_frames": chunk, "steps": steps,
                "model": model_name}
        # The token goes over the queuing page's own websocket (before the first frame), never into
        # the node's output: the host keeps outputs in GET /history, which every client can read.
        server.send_sync(STARTED_EVENT, {**info, "node": node_id, "session": holder["token"]}, client_id)
        live.start()
        view = ((frames[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1)
        log.info("FastGen world session started for %s: %s, world %d, %d steps per chunk of %d", client_id, model_name,
                 world_seed, steps, chunk)
        return io.NodeOutput(view, ui={"fastgen_world": [info]})


# ------------------------------------------------------------------ routes


async def _body(request) -> dict:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(raw))
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _error(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise _error(400, "the body must be a JSON object")
    return body


_ERRORS = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 429: web.HTTPTooManyRequests}


def _error(status: int, message: str) -> web.HTTPException:
    return _ERRORS[status](text=json.dumps({"error": message}), content_type="application/json")


def _session(body_or_query) -> tuple[WorldSession, RateLimiter]:
    found = SESSIONS.get(body_or_query.get("session"))
    if found is None:
        raise _error(404, "no such world session (it stopped, or was never started): queue the World Session node")
    return found[0], found[2]


async def world_action(request):
    body = await _body(request)
    live, limiter = _session(body)
    if not limiter.allow():
        raise _error(429, f"too many actions: at most {ACTION_RATE:g} a second")
    try:
        live.act(body.get("action"))
    except ValueError as error:
        raise _error(400, str(error)) from None
    return web.json_response({"ok": True, "status": live.status()})


async def world_reset(request):
    live, limiter = _session(await _body(request))
    if not limiter.allow():
        raise _error(429, "too many requests")
    live.reset()
    return web.json_response({"ok": True, "status": live.status()})


async def world_stop(request):
    live, _ = _session(await _body(request))
    live.stop("stopped from the page", wait=0)
    return web.json_response({"ok": True})


async def world_status(request):
    live, _ = _session(request.query)
    return web.json_response(live.status())


def register_routes(server) -> bool:
    if server is None or not hasattr(server, "routes"):
        return False
    server.routes.post("/fastgen/world/action")(world_action)
    server.routes.post("/fastgen/world/reset")(world_reset)
    server.routes.post("/fastgen/world/stop")(world_stop)
    server.routes.get("/fastgen/world/status")(world_status)
    return True


register_routes(prompt_server())
