"""The live world-model session (#8): a background loop steered by actions as it runs."""

import threading
import time

import pytest
import torch

from fastgen_core import data, networks, session, world

NAMES = (*data.GAME_ACTIONS,)


def tiny_model():
    config = networks.CausalWorldDiTConfig(frame_size=16, patch_size=8, dim=32, depth=1, heads=2)
    return networks.CausalWorldDiT(config).init_weights(0).eval()


class Recorder:
    def __init__(self):
        self.chunks, self.event = [], threading.Event()

    def __call__(self, frames, first, status):
        self.chunks.append((frames.clone(), first, status))
        self.event.set()

    def wait_for(self, count, timeout=20.0):
        deadline = time.monotonic() + timeout
        while len(self.chunks) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.chunks) >= count, f"only {len(self.chunks)} chunks in {timeout} s"


def start_frames(frames=2):
    return torch.zeros(1, 3, frames, 16, 16), torch.zeros(1, frames, dtype=torch.long)


def make(recorder, **kw):
    settings = dict(chunk_frames=2, schedule=world.ChunkSchedule.few_step(1), max_fps=1000.0, idle_seconds=30.0)
    settings.update(kw)
    return session.WorldSession(tiny_model(), start_frames(), recorder, NAMES, **settings)


def test_frames_arrive_in_order_and_actions_steer_the_next_chunk():
    recorder = Recorder()
    seen = []
    live = make(recorder)
    original = live._chunk_actions
    live._chunk_actions = lambda first, frames: seen.append(original(first, frames)) or seen[-1]
    live.start()
    try:
        recorder.wait_for(3)
        live.act("left")
        live.act("jump")
        count = len(seen)
        recorder.wait_for(len(recorder.chunks) + 3)
    finally:
        live.stop()
    firsts = [first for _, first, _ in recorder.chunks]
    assert firsts[:4] == [0, 2, 4, 6], "the start view first, then chunks in order"
    assert recorder.chunks[0][0].shape == (2, 3, 16, 16)
    later = [a[0].tolist() for a in seen[count:]]
    assert [5, 3] in later, "the jump goes first in the next chunk, the held direction fills the rest"
    assert later[-1] == [3, 3], "a direction stays held"
    # each chunk's stats name the actions it was generated under (the page can label its frames)
    labelled = [status["chunk_actions"] for _, first, status in recorder.chunks if first > 0]
    assert [NAMES[5], NAMES[3]] in labelled and labelled[-1] == [NAMES[3], NAMES[3]]
    assert not live.running and live.stop_reason == "stopped"


def test_bad_actions_are_refused_and_a_flood_stays_bounded():
    live = make(Recorder(), queue_size=4)
    for bad in ("fly", 17, -1, None, True, 2.5):
        with pytest.raises(ValueError, match="unknown action"):
            live.act(bad)
    for _ in range(100):
        live.act("jump")
    assert len(live.pending) == 4
    assert live.act(4) == 4 and live.status()["action"] == "right"


def test_rate_limiter_allows_bursts_then_the_rate():
    now = [0.0]
    limiter = session.RateLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 0.35  # 3.5 tokens back
    assert [limiter.allow() for _ in range(4)] == [True] * 3 + [False]


def test_idle_session_stops_by_itself_and_reset_restarts_from_the_first_view():
    recorder, stopped = Recorder(), threading.Event()
    live = make(recorder, idle_seconds=3.0, on_stop=lambda s: stopped.set())  # 3 s: a busy CPU makes the first chunks slow
    live.start()
    recorder.wait_for(2)
    live.reset()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(first == 0 for _, first, _ in recorder.chunks) < 2:
        live.act("none")  # a player is there: not idle
        time.sleep(0.05)
    assert sum(first == 0 for _, first, _ in recorder.chunks) >= 2, "reset shows the first view again"
    assert live.running
    assert stopped.wait(20), "the idle session did not stop"
    assert live.stop_reason.startswith("idle") and not live.running


def test_error_in_the_loop_stops_the_session_and_is_reported():
    def broken(frames, first, status):
        if first > 0:
            raise RuntimeError("socket gone")

    live = make(broken)
    live.start()
    live.thread.join(10)
    assert not live.running and live.status()["error"] == "RuntimeError: socket gone"


def test_pacing_holds_the_delivered_rate_near_max_fps():
    recorder = Recorder()
    live = make(recorder, max_fps=20.0)
    live.start()
    time.sleep(1.5)
    live.stop()
    status = live.status()
    assert status["fps"] <= 20.0 * 1.2, status
    assert status["generation_fps"] > status["fps"] or status["fps"] > 10, status


def test_walking_pace_moves_on_every_nth_frame():
    live = make(Recorder(), frames_per_step=2)
    live.act("left")
    assert live._chunk_actions(0, 4).tolist() == [[3, 0, 3, 0]]
    assert live._chunk_actions(5, 4).tolist() == [[0, 3, 0, 3]], "the pace follows the video's frame count"
    live.act("jump")
    assert live._chunk_actions(8, 4).tolist() == [[5, 0, 3, 0]], "a queued jump goes first"
    with pytest.raises(ValueError, match="frames_per_step"):
        make(Recorder(), frames_per_step=0)
