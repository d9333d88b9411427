"""The causal loop (#7): cached chunk-by-chunk generation equals the block-causal full forward,
the rolling window keeps memory flat, the per-chunk schedule and the streaming order hold."""

import pytest
import torch

from fastgen_core import world
from fastgen_core.networks import CausalWorldDiT, CausalWorldDiTConfig

CONFIG = CausalWorldDiTConfig(frame_size=16, patch_size=4, dim=32, depth=2, heads=2)
# camera-relative RoPE: whole-patch and sub-patch moves (pixels per frame; patches are 4 px)
CAMERA = CausalWorldDiTConfig(frame_size=16, patch_size=4, dim=32, depth=2, heads=2,
                              camera_motion=((0, 0), (0, -4), (0, 4), (-2, 0), (6, 0), (0, 0), (0, 0)))


def random_model(seed=0, config=CONFIG):
    """Every weight random: adaLN-Zero's zeroed gates would make every output 0 and every test pass."""
    model = CausalWorldDiT(config).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return model.eval()


def sequence(chunks=3, chunk_frames=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    frames = chunks * chunk_frames
    x = torch.randn(2, 3, frames, 16, 16, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, CONFIG.actions, (2, frames), generator=gen)
    return x, actions


@pytest.mark.parametrize("config", [CONFIG, CAMERA], ids=["frame-rope", "camera-rope"])
def test_cached_chunks_equal_the_block_causal_full_forward(config):
    model = random_model(config=config)
    x, actions = sequence()
    sigma = torch.zeros(2, 6, dtype=torch.float64)
    sigma[:, 4:] = 0.7  # clean context, noisy last chunk: what a rollout step sees
    with torch.no_grad():
        full = model.forward_sequence(x, sigma, actions, chunk_frames=2)
        cache = world.KVCache()
        outs = [model(x[:, :, i:i + 2], sigma[:, i:i + 2], actions[:, i:i + 2], cache, write_cache=i < 4) for i in (0, 2, 4)]
    for i, out in zip((0, 2, 4), outs, strict=True):
        assert (out - full[:, :, i:i + 2]).abs().max() < 1e-10, f"chunk at frame {i}"
    # the mask matters: without it the first chunk would see the later ones
    unmasked = model.forward_sequence(x, sigma, actions, chunk_frames=6)
    assert (unmasked[:, :, :2] - full[:, :, :2]).abs().max() > 1e-3


class Spy(torch.nn.Module):
    """The model, recording each denoising call (not the cache writes)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls, self.writes = model, model.config, [], []

    def forward(self, x, sigma, actions, cache, write_cache=False):
        out = self.model(x, sigma, actions, cache, write_cache)
        (self.writes if write_cache else self.calls).append((x.clone(), sigma.clone(), actions.clone(), out.clone()))
        return out


@pytest.mark.parametrize("config", [CONFIG, CAMERA], ids=["frame-rope", "camera-rope"])
def test_rollout_steps_equal_the_full_forward_over_its_own_clean_frames(config):
    spy = Spy(random_model(config=config))
    _, actions = sequence()
    chunks = list(world.rollout(spy, world.KVCache(), chunks=3, chunk_frames=2, schedule=world.ChunkSchedule.few_step(2),
                                actions=actions, batch=2, seed=3, device="cpu"))
    x, sigma, chunk_actions, out = spy.calls[-2]  # the last chunk's first step
    clean = torch.cat([c.latents for c in chunks[:2]], dim=2)
    sequence_x = torch.cat([clean, x], dim=2)
    sequence_sigma = torch.cat([torch.zeros(2, 4, dtype=sigma.dtype), sigma], dim=1)
    with torch.no_grad():
        full = spy.model.forward_sequence(sequence_x, sequence_sigma, actions, chunk_frames=2)
    assert torch.equal(chunk_actions, actions[:, 4:6])
    assert (out - full[:, :, 4:]).abs().max() < 1e-10


def test_rolling_window_keeps_memory_flat_over_100_chunks():
    model = random_model().float()
    cache = world.KVCache(sink_frames=2, window_frames=4)
    sizes = []
    for chunk in world.rollout(model, cache, chunks=100, chunk_frames=2, schedule=world.ChunkSchedule.few_step(1), seed=0):
        sizes.append((cache.frames, cache.nbytes()))
        assert torch.isfinite(chunk.latents).all()
    assert sizes[2:] == [sizes[2]] * 98, "the cache grew after the window filled"
    assert sizes[2][0] == 6 and cache.frames_seen == 200 and cache.evicted == 194
    k, _, positions = cache.context(0)
    assert positions.max().item() == 5  # renumbered slots: no position beyond sink + window


@pytest.mark.parametrize("token_dim", [1, 2], ids=["host-layout", "heads-layout"])
def test_kv_buffer_equals_concatenation_with_eviction_and_stops_allocating_once_full(token_dim):
    """attend() over [held, chunk] and the held frames after append() are what concatenating and
    cutting gives (the cache before its buffer), whether the chunk's keys were written by attend()
    (the host Wan's path: no copy) or handed to append() (CausalWorldDiT's); once the window is
    full the buffers keep their size and their addresses."""
    sink, window, chunk, tokens, layers = 2, 4, 2, 3, 3
    cache = world.KVCache(sink_frames=sink, window_frames=window, token_dim=token_dim)
    gen = torch.Generator().manual_seed(0)
    shape = [2, chunk * tokens, 8] if token_dim == 1 else [2, 4, chunk * tokens, 5]

    def pairs():
        return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(layers)]

    held, storage = None, []
    for index in range(12):
        for k_v in (pairs(), pairs()):  # two denoising passes: each overwrites the chunk's slots
            for layer, (k, v) in enumerate(k_v):
                keys, values = cache.attend(layer, k, v)
                expected = (k, v) if held is None else (torch.cat([held[layer][0], k], token_dim),
                                                         torch.cat([held[layer][1], v], token_dim))
                assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])
        written = pairs()
        if index % 2:
            cache.append(written, chunk)
        else:  # the write pass through attend, then append of the very views it returned
            slots = []
            for layer, (k, v) in enumerate(written):
                keys, values = cache.attend(layer, k, v)
                slots.append((keys.narrow(token_dim, keys.shape[token_dim] - k.shape[token_dim], k.shape[token_dim]),
                              values.narrow(token_dim, values.shape[token_dim] - v.shape[token_dim], v.shape[token_dim])))
            cache.append(slots, chunk)
        held = written if held is None else [(torch.cat([h[0], w[0]], token_dim), torch.cat([h[1], w[1]], token_dim))
                                             for h, w in zip(held, written, strict=True)]
        frames = held[0][0].shape[token_dim] // tokens
        if frames > sink + window:  # keep the sink and the latest window
            held = [tuple(torch.cat([t.narrow(token_dim, 0, sink * tokens),
                                     t.narrow(token_dim, (frames - window) * tokens, window * tokens)], token_dim) for t in h)
                    for h in held]
        for layer in range(layers):
            k, v, positions = cache.context(layer)
            assert torch.equal(k, held[layer][0]) and torch.equal(v, held[layer][1])
            assert torch.equal(positions, torch.arange(cache.frames).repeat_interleave(tokens))
        storage.append((cache.allocated_bytes(), [k.data_ptr() for k, _ in cache.layers]))
    assert cache.frames == sink + window and cache.evicted == 12 * chunk - sink - window
    full = (sink + window) // chunk - 1  # the chunk after which the window is full
    assert storage[full:] == [storage[full]] * (12 - full), "the buffers grew or moved after the window filled"
    per_frame = 2 * layers * 4 * (shape[0] * 8 if token_dim == 1 else shape[0] * 4 * 5) * tokens  # k + v, float32
    assert cache.allocated_bytes() == (sink + window + chunk) * per_frame and cache.nbytes() == (sink + window) * per_frame


def test_first_chunk_and_later_chunk_steps_are_honoured():
    spy = Spy(random_model())
    schedule = world.ChunkSchedule.few_step(2, first_steps=4)
    list(world.rollout(spy, world.KVCache(), chunks=3, chunk_frames=2, schedule=schedule, device="cpu"))
    assert len(spy.calls) == 4 + 2 + 2 and len(spy.writes) == 3
    first_sigmas = [round(float(c[1][0, 0]), 4) for c in spy.calls[:4]]
    assert first_sigmas == [round(s, 4) for s in schedule.first[:-1]]
    assert all(float(w[1].abs().max()) == 0.0 for w in spy.writes), "context must be written at noise level 0"


def test_streaming_yields_in_order_and_asks_for_actions_just_in_time():
    model = random_model().float()
    events = []

    def live_actions(first, frames):
        events.append(("actions", first))
        return torch.full((1, frames), 3)

    for chunk in world.rollout(model, world.KVCache(window_frames=4), chunks=4, chunk_frames=2,
                               schedule=world.ChunkSchedule.few_step(2), actions=live_actions):
        events.append(("chunk", chunk.first_frame))
        assert chunk.seconds > 0 and chunk.latents.shape == (1, 3, 2, 16, 16)
    assert events == [(kind, f) for f in (0, 2, 4, 6) for kind in ("actions", "chunk")]


def test_context_noise_and_bad_actions():
    spy = Spy(random_model())
    list(world.rollout(spy, world.KVCache(), chunks=1, chunk_frames=2, schedule=world.ChunkSchedule.few_step(1),
                       context_noise=0.1, device="cpu"))
    assert float(spy.writes[0][1][0, 0]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must be \\[1, 2\\]"):
        next(world.rollout(spy, world.KVCache(), chunks=1, chunk_frames=2, schedule=world.ChunkSchedule.few_step(1),
                           actions=lambda first, frames: torch.zeros(1, 3)))
    with pytest.raises(ValueError, match="actions cover 1 frames"):
        next(world.rollout(spy, world.KVCache(), chunks=1, chunk_frames=2, schedule=world.ChunkSchedule.few_step(1),
                           actions=torch.zeros(1, 1, dtype=torch.long)))


def test_prefix_frames_go_into_the_cache_before_generation():
    spy = Spy(random_model())
    x, actions = sequence(chunks=3)
    chunks = list(world.rollout(spy, world.KVCache(), chunks=1, chunk_frames=2, schedule=world.ChunkSchedule.few_step(1),
                                prefix=(x[:, :, :4], actions[:, :4]), actions=actions, batch=2, device="cpu"))
    assert [float(w[1].abs().max()) for w in spy.writes[:2]] == [0.0, 0.0] and len(spy.writes) == 3
    assert torch.equal(spy.writes[0][0], x[:, :, :2]) and chunks[0].first_frame == 4
    assert torch.equal(spy.calls[0][2], actions[:, 4:6]), "generation continues with the actions after the prefix"


class Constant(torch.nn.Module):
    """Outputs the same tensor whatever it is given: x0-prediction must return it as the final
    frames, velocity prediction must turn it into x - sigma * v."""

    def __init__(self, prediction):
        super().__init__()
        self.config = CausalWorldDiTConfig(frame_size=16, patch_size=4, dim=32, depth=1, heads=2, prediction=prediction)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.value = torch.full((1, 3, 2, 16, 16), 0.25)

    def forward(self, x, sigma, actions, cache=None, write_cache=False):
        return self.value.expand(x.shape[0], -1, x.shape[2], -1, -1)


def test_the_loop_reads_the_output_as_the_config_says():
    schedule = world.ChunkSchedule.few_step(1)  # one step from sigma 1: the final frames are the first x0
    run = lambda model: next(world.rollout(model, world.KVCache(), chunks=1, chunk_frames=2, schedule=schedule, device="cpu"))
    assert torch.allclose(run(Constant("x0")).latents, torch.tensor(0.25))
    velocity = Constant("velocity")
    noise = torch.randn((1, 3, 2, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(run(velocity).latents, noise - 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="prediction must be"):
        CausalWorldDiT(CausalWorldDiTConfig(prediction="eps"))


def test_world_training_runs_and_its_loss_ignores_the_clean_frames():
    from fastgen_core import train

    config = CausalWorldDiTConfig(dim=32, depth=1, heads=2)
    x0 = torch.rand(2, 3, 8, 64, 64) * 2 - 1
    actions = torch.zeros(2, 8, dtype=torch.long)

    class Oracle(torch.nn.Module):  # predicts the clean frames exactly: no loss whatever the noise
        config = CausalWorldDiTConfig(prediction="x0")

        def forward_sequence(self, x, sigma, actions, chunk_frames):
            return x0

    assert train.world_loss(Oracle(), x0, actions, 4, torch.Generator().manual_seed(0)).item() == 0.0
    net = train.train_world(minutes=None, steps=3, batch=2, config=config, episodes=2, episode_frames=16, clip_frames=8,
                            log=lambda *_: None)
    assert isinstance(net, CausalWorldDiT) and not net.training


def test_probe_scores_a_model_that_moves_the_view_as_told():
    """world_probe's measure on a stand-in that renders the game itself: every move agrees."""
    from fastgen_core import data, train

    class Renderer(torch.nn.Module):
        config = CausalWorldDiTConfig(prediction="x0")

        def forward_sequence(self, x, sigma, actions, chunk_frames):
            game = data.Game(int(self.seed))
            frames = [game.step(int(a)) for a in actions[0].tolist()]
            return torch.stack(frames, 1)[None]

    renderer = Renderer()
    renderer.weight = torch.nn.Parameter(torch.zeros(1))  # the probe reads the device off a parameter
    renderer.seed = 1_000_000
    assert train.world_probe(renderer, worlds=1, seed=1_000_000) == "motion agreement 100% (16 frames, 4 move actions)"


def test_camera_rope_sees_the_same_place_of_the_world_at_offset_zero():
    """With camera_motion, a token's position is where it lies in the world: after a "right"
    move of one patch the content at world column c sits one screen column further left, and its
    rotary position is the same as before the move."""
    config = CausalWorldDiTConfig(frame_size=16, patch_size=4, dim=32, depth=1, heads=2,
                                  camera_motion=((0, 0), (0, 0), (0, 0), (0, 0), (4, 0), (0, 0), (0, 0)))
    model = CausalWorldDiT(config)
    positions = model._positions(torch.tensor([[0, 4]]), 0, 2)  # still, then one patch right
    grid = positions.view(2, 4, 4, 3)  # frame, row, column, (frame, world x, world y)
    assert torch.equal(grid[1, :, :-1, 1:], grid[0, :, 1:, 1:])  # screen column c+1 then = column c now
    assert torch.equal(grid[:, :, :, 0], torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 4, 4))
    # the cache re-bases: a chunk after the move measures the world from the moved camera
    cache = world.KVCache()
    with torch.no_grad():
        model(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 2), torch.tensor([[0, 4]]), cache, write_cache=True)
    _, _, stored = cache.context(0)
    assert torch.equal(stored[0, 16:, 1:], grid[1].reshape(16, 3)[:, 1:] - torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="one \\(dx, dy\\) pair per action"):
        CausalWorldDiTConfig(camera_motion=((0, 0),))


def test_camera_config_round_trips_and_old_configs_read_the_same():
    assert "camera_motion" not in CONFIG.to_dict()
    assert CausalWorldDiTConfig.from_dict(CAMERA.to_dict()) == CAMERA
    import json

    assert CausalWorldDiTConfig.from_dict(json.loads(json.dumps(CAMERA.to_dict()))) == CAMERA


def test_chunk_schedule_follows_the_recipe():
    from fastgen_core.recipe import Recipe

    student = Recipe(family="fastgen-game", prediction="flow", steps=2, sampler="multistep_sde", sigmas=[0.999, 0.5], shift=None)
    assert world.ChunkSchedule.for_recipe(student).later == [0.999, 0.5, 0.0]
    assert world.ChunkSchedule.for_recipe(student, steps=2).first == [0.999, 0.5, 0.0]
    assert len(world.ChunkSchedule.for_recipe(student, steps=4).later) == 5  # other steps: evenly spaced
    teacher = Recipe(family="fastgen-game", prediction="flow", steps=4, sampler="multistep_ode", shift=1.0)
    assert world.ChunkSchedule.for_recipe(teacher).later == world.ChunkSchedule.few_step(4).later
    assert world.ChunkSchedule.for_recipe(None).later == world.ChunkSchedule.few_step(4).later


def test_chunk_schedule_reads_a_recipes_timesteps_under_its_shift():
    """Timesteps mean what the host makes of them (the Student KSampler's sigmas): t / 1000 under
    the recipe's flow shift, so a world session and a sampler agree on the same recipe."""
    from fastgen_core.recipe import Recipe

    plain = Recipe(family="fastgen-game", prediction="flow", steps=2, sampler="multistep_sde", timesteps=[999, 500])
    assert world.ChunkSchedule.for_recipe(plain).later == [0.999, 0.5, 0.0]
    shifted = Recipe(family="wan2.1", prediction="flow", steps=4, sampler="multistep_sde", timesteps=[1000, 750, 500, 250], shift=5.0)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(world.ChunkSchedule.for_recipe(shifted).sigmas(0), torch.cat([5 * t / (1 + 4 * t), torch.zeros(1)]))


@pytest.mark.parametrize("window", [None, 4])
def test_a_reserved_cache_allocates_its_buffers_once(window):
    """reserve(frames, tokens per frame): every buffer is allocated at its final size on the first
    write (the whole video, or sink + window + a chunk when a window bounds it) and never moves."""
    cache = world.KVCache(sink_frames=2, window_frames=window, token_dim=1)
    chunk, tokens, frames = 2, 3, 12
    cache.reserve(frames, tokens)
    layouts = []
    for _ in range(frames // chunk):
        k = torch.randn(1, chunk * tokens, 4)
        keys, values = cache.attend(0, k, k + 1)
        assert torch.equal(keys[:, -chunk * tokens:], k)
        cache.append([cache.slots(0, chunk * tokens)], chunk)
        layouts.append((cache.allocated_bytes(), cache.layout()[1]))
    assert layouts == [layouts[0]] * len(layouts), "a buffer grew or moved"
    slots = frames if window is None else 2 + window + chunk
    assert cache.allocated_bytes() == 2 * slots * tokens * 4 * 4  # keys + values, float32


@pytest.mark.parametrize("value", [10**7, 0, "4", 2.5, True])
def test_a_recipes_chunk_length_is_checked_before_a_session_renders_it(value):
    """chunk_frames comes from the model file's recipe: a session renders and holds that many
    frames at once, so a huge or malformed one is refused, naming the file."""
    from fastgen_core.recipe import Recipe
    from fastgen_core.world import MAX_CHUNK_FRAMES, recipe_chunk_frames

    recipe = Recipe(family="fastgen-game", prediction="flow", steps=2, extra={"chunk_frames": value})
    with pytest.raises(ValueError, match=f"evil.safetensors: its recipe's chunk_frames .* in 1..{MAX_CHUNK_FRAMES}"):
        recipe_chunk_frames(recipe, "evil.safetensors")
    assert recipe_chunk_frames(None, "x") == 4
    assert recipe_chunk_frames(Recipe(family="g", prediction="flow", steps=2, extra={"chunk_frames": 3}), "x") == 3
