"""A live world-model session: the causal loop of `world.rollout` run by a background thread,
steered by actions that arrive while it runs (a keyboard in the browser), frames handed to a sink
as each chunk is final.

    session = WorldSession(model, start=(frames, actions), on_frames=push, schedule=world.ChunkSchedule.few_step(4))
    session.start()
    session.act("left")          # from a request handler: the next chunk moves left
    session.reset(); session.stop()

Host-free (the node layer wires `on_frames` to the host's websocket and the routes to `act`).
Robust to its input: an unknown action is refused with a ValueError (the route answers 400), the
action rate is limited per session by a token bucket (`RateLimiter`, the route answers 429), and
the pending one-shot actions (a jump) sit in a bounded queue. The loop stops by itself after
`idle_seconds` without an action, or when `stop()` is called; an error inside the loop stops it
and is kept in `error` for the status route.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch

from . import world

ONE_SHOT_ACTIONS = frozenset({"jump"})  # taken once from the queue; the others are held until changed


class RateLimiter:
    """Token bucket: `rate` events a second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


class WorldSession:
    """One player's running world model.

    `start` = (frames [1, C, F0, H, W], actions [1, F0]) seeds the cache (the first view of the
    world); `on_frames(frames [F, C, H, W] in -1..1, first_frame_index, stats)` receives each
    finished chunk from the worker thread. `action_names` maps names to the model's action ids.
    """

    def __init__(self, model, start, on_frames, action_names: tuple[str, ...], chunk_frames: int = 4,
                 sampler: str = "sde", window_frames: int = 12, sink_frames: int = 4, max_fps: float = 30.0,
                 idle_seconds: float = 120.0, queue_size: int = 8, seed: int = 0,
                 on_stop: Callable[[WorldSession], None] | None = None, schedule: world.ChunkSchedule | None = None,
                 frames_per_step: int = 1):
        if max_fps <= 0 or idle_seconds <= 0 or frames_per_step < 1:
            raise ValueError("max_fps and idle_seconds must be positive, frames_per_step at least 1")
        # a held direction moves the agent on every `frames_per_step`-th frame ("none" between):
        # its walking pace at a given frame rate
        self.frames_per_step = frames_per_step
        self.model, self.start_frames, self.on_frames, self.on_stop = model, start, on_frames, on_stop
        self.action_names = tuple(action_names)
        self.chunk_frames, self.sampler, self.seed = chunk_frames, sampler, seed
        self.schedule = schedule or world.ChunkSchedule.few_step(4)  # ChunkSchedule.for_recipe: a distilled model's own levels
        self.window_frames, self.sink_frames = window_frames, sink_frames
        self.max_fps, self.idle_seconds = max_fps, idle_seconds
        self.pending: collections.deque[int] = collections.deque(maxlen=queue_size)
        self.no_action = self.action_names.index("none")
        self.held = self.no_action
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.reset_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.frames_out = 0
        self.fps = 0.0  # frames delivered per second (paced to max_fps)
        self.generation_fps = 0.0  # frames the model makes per second of its own work
        self.last_action_time = time.monotonic()
        self.stop_reason: str | None = None
        self.error: str | None = None

    # ------------------------------------------------------------------ called from other threads
    def act(self, action) -> int:
        """Steer the next chunk: a direction (or "none") is held until changed, "jump" happens once."""
        index = self.action_index(action)
        with self.lock:
            if self.action_names[index] in ONE_SHOT_ACTIONS:
                self.pending.append(index)  # bounded: a flood drops the oldest, never grows
            else:
                self.held = index
            self.last_action_time = time.monotonic()
        return index

    def action_index(self, action) -> int:
        if isinstance(action, str) and action in self.action_names:
            return self.action_names.index(action)
        if isinstance(action, int) and not isinstance(action, bool) and 0 <= action < len(self.action_names):
            return action
        raise ValueError(f"unknown action {action!r}: use one of {', '.join(self.action_names)}")

    def start(self):
        if self.thread is not None:
            raise RuntimeError("the session was started already")
        self.thread = threading.Thread(target=self._run, name="fastgen-world-session", daemon=True)
        self.thread.start()
        return self

    def reset(self):
        """Back to the first view (the start frames), cache emptied; the session keeps running."""
        with self.lock:
            self.held = self.no_action
            self.pending.clear()
            self.last_action_time = time.monotonic()
        self.reset_requested.set()

    def stop(self, reason: str = "stopped", wait: float = 5.0):
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopping.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(wait)

    @property
    def running(self) -> bool:
        """Generating and not stopping: False from the moment a stop reason is set (the worker
        thread may still be winding down, e.g. inside `on_stop`)."""
        return self.thread is not None and self.thread.is_alive() and self.stop_reason is None

    def status(self) -> dict:
        return {"running": self.running, "frames": self.frames_out, "fps": round(self.fps, 1),
                "generation_fps": round(self.generation_fps, 1),
                "action": self.action_names[self.held], "queued": len(self.pending),
                "stopped": self.stop_reason, "error": self.error}

    # ------------------------------------------------------------------ the worker thread
    def _chunk_actions(self, first_frame: int, frames: int) -> torch.Tensor:
        """Asked by the rollout just before each chunk: the held action on every `frames_per_step`-th
        frame of the video ("none" between), with a queued jump first."""
        with self.lock:
            actions = [self.held if (first_frame + i) % self.frames_per_step == 0 else self.no_action for i in range(frames)]
            if self.pending:
                actions[0] = self.pending.popleft()
            return torch.tensor([actions], dtype=torch.long)

    def _loop(self):
        cache = world.KVCache(sink_frames=self.sink_frames, window_frames=self.window_frames)
        frames, actions = self.start_frames
        return world.rollout(self.model, cache, chunks=None, chunk_frames=self.chunk_frames, schedule=self.schedule,
                             actions=self._chunk_actions, prefix=(frames, actions), sampler=self.sampler,
                             seed=self.seed)

    def _run(self):
        try:
            loop = self._loop()
            started, produced, busy = time.monotonic(), 0, 0.0
            first = self.start_frames[0][0].transpose(0, 1)
            self.on_frames(first, 0, self.status())
            while not self.stopping.is_set():
                if time.monotonic() - self.last_action_time > self.idle_seconds:
                    self.stop_reason = self.stop_reason or f"idle for {self.idle_seconds:g} s"
                    break
                if self.reset_requested.is_set():
                    self.reset_requested.clear()
                    loop = self._loop()
                    started, produced, busy = time.monotonic(), 0, 0.0
                    self.on_frames(first, 0, self.status())
                chunk = next(loop)
                produced += chunk.latents.shape[2]
                busy += chunk.seconds
                self.frames_out += chunk.latents.shape[2]
                self.fps = produced / max(time.monotonic() - started, 1e-6)
                self.generation_fps = produced / max(busy, 1e-6)
                stats = dict(self.status(), chunk_actions=[self.action_names[a] for a in chunk.actions[0].tolist()])
                self.on_frames(chunk.latents[0].transpose(0, 1).clamp(-1, 1), chunk.first_frame, stats)
                # pace to max_fps: the page plays frames at that rate, so running ahead only burns CPU
                ahead = produced / self.max_fps - (time.monotonic() - started)
                if ahead > 0:
                    self.stopping.wait(ahead)
        except Exception as error:  # kept for the status route; the server keeps running
            self.error = f"{type(error).__name__}: {error}"
            self.stop_reason = self.stop_reason or "error"
        finally:
            if self.stop_reason is None:
                self.stop_reason = "stopped"
            if self.on_stop is not None:
                self.on_stop(self)
