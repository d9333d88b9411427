"""fastgen_core.cache (#6): exactness at threshold 0, deterministic decisions, no state leak, the
step window and few-step gate, and the chunk cache skipping static chunks."""

import math

import pytest
import torch

from fastgen_core import cache, sampling
from fastgen_core.networks import NULL_CLASS, DigitDiT, DigitDiTConfig, class_conditioning

STEPS = 12


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = DigitDiT(DigitDiTConfig(dim=64, depth=3, heads=4, image_size=16)).init_weights(seed=0)
    with torch.no_grad():  # adaLN-Zero starts as the identity: give the gates and head some weight
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model.eval()


def sample(net, config, labels=(3, 7), seed=0, steps=STEPS, profile=None, run=None):
    """Euler with CFG 3 (cond and uncond batched, two groups), returns (images, run)."""
    sigmas = sampling.flow_sigmas(steps, 1.0)
    if run is None and config is not None:
        run = cache.CacheRun(config, sigmas, profile)
    n = len(labels)
    weights = torch.cat([class_conditioning(list(labels))[:, 0], class_conditioning([NULL_CLASS] * n)[:, 0]])

    def denoise(x, sigma):
        s = torch.as_tensor(sigma).reshape(-1).expand(2 * n)
        v_cond, v_uncond = cache.digit_forward(net, torch.cat([x, x]), s, weights, run, groups=2).chunk(2)
        return x - s[:n].reshape(-1, 1, 1, 1) * (v_uncond + 3.0 * (v_cond - v_uncond))

    noise = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return sampling.sample_euler(denoise, noise, sigmas), run


@pytest.mark.parametrize("policy", list(cache.POLICIES))
def test_threshold_zero_reproduces_the_uncached_output_exactly(net, policy):
    reference, _ = sample(net, None)
    out, run = sample(net, cache.CacheConfig(policy=policy, threshold=0.0, max_skips=16))
    assert torch.equal(out, reference)
    assert run.stats.steps_skipped == 0 and run.stats.blocks_skipped == 0 and run.stats.chunks_skipped == 0
    assert run.stats.calls == STEPS


@pytest.mark.parametrize("policy,threshold", [("step", 0.3), ("block", 1.0), ("chunk", 1.0)])
def test_skip_decisions_are_deterministic_and_skip_something(net, policy, threshold):
    config = cache.CacheConfig(policy=policy, threshold=threshold)
    first, run1 = sample(net, config)
    second, run2 = sample(net, config)
    assert torch.equal(first, second)
    assert run1.stats.as_dict() | {"seconds": 0, "measured_speedup": 0} == run2.stats.as_dict() | {"seconds": 0, "measured_speedup": 0}
    skipped = run1.stats.steps_skipped + run1.stats.blocks_skipped + run1.stats.chunks_skipped
    assert skipped > 0, run1.stats.summary()
    reference, _ = sample(net, None)
    assert not torch.equal(first, reference)  # it did reuse something
    assert torch.isfinite(first).all()


def test_no_state_leaks_between_runs_or_streams(net):
    config = cache.CacheConfig(policy="step", threshold=0.3)
    alone, _ = sample(net, config, labels=(3, 7), seed=0)
    # a run over other inputs first, in its own CacheRun, changes nothing about the next run
    sample(net, config, labels=(1, 2), seed=5)
    again, _ = sample(net, config, labels=(3, 7), seed=0)
    assert torch.equal(alone, again)
    # two streams in one run (different keys, as cond/uncond batches of different calls): each
    # equals its stream run alone
    sigmas = sampling.flow_sigmas(STEPS, 1.0)
    shared = cache.CacheRun(config, sigmas)
    x_a = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x_b = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 3
    w = class_conditioning([4])[:, 0]
    solo = cache.CacheRun(config, sigmas)
    with torch.no_grad():
        for sigma in sigmas[:-1]:
            s = sigma.reshape(1)
            together = cache.digit_forward(net, x_a, s, w, shared, key="cond")
            cache.digit_forward(net, x_b, s, w, shared, key="uncond")
            assert torch.equal(together, cache.digit_forward(net, x_a, s, w, solo, key="cond"))
            x_a, x_b = x_a - 0.05 * together, x_b * 0.97


def test_first_and_last_steps_and_the_window_never_skip():
    config = cache.CacheConfig(threshold=10.0, start=0.25, end=0.75)
    steps = 20
    allowed = [i for i in range(steps) if cache.in_window(i, steps, config)]
    assert allowed == list(range(5, 15))
    full = cache.CacheConfig(threshold=10.0)
    assert not cache.in_window(0, steps, full) and not cache.in_window(steps - 1, steps, full)


def test_step_cache_with_a_profile_follows_it_and_max_skips():
    sigmas = [1 - i / 10 for i in range(11)]
    profile = cache.ChangeProfile(sigmas, [math.inf, 0.5, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.5, 0.01])
    config = cache.CacheConfig(threshold=0.05, max_skips=2, extrapolate=False)
    run = cache.CacheRun(config, sigmas, profile)
    state = run.stream("k")
    decisions = []
    x = torch.ones(1, 4)
    for step in range(10):
        skipped_before = run.stats.steps_skipped
        state.run(x, sigmas[step], step, 10, lambda step=step: x * step)
        decisions.append(run.stats.steps_skipped > skipped_before)
    # steps 0, 1 compute (nothing cached, large change); 2-3 skip, 4 (max_skips 2) computes;
    # 5-6 skip; 7 computes (max); 8 changes by 0.5: compute; 9 is the last step
    assert decisions == [False, False, True, True, False, True, True, False, False, False]


def test_few_steps_need_a_profile_and_profiles_roundtrip():
    sigmas = sampling.flow_sigmas(4, 1.0).tolist()
    config = cache.CacheConfig(threshold=0.5)
    off = cache.CacheRun(config, sigmas)
    assert not off.enabled and "Calibrate Cache" in off.reason
    recorder = cache.ProfileRecorder()
    for step in range(4):
        recorder.record("cond", step, 1, torch.full((1, 3), float(step + 1)))
    profile = cache.ChangeProfile.from_json(recorder.profile(sigmas).to_json())
    assert profile.change[0] == math.inf and profile.change[1:] == pytest.approx([1.0, 0.5, 1 / 3])
    assert cache.CacheRun(config, sigmas, [profile]).enabled
    other = cache.CacheRun(config, sampling.flow_sigmas(4, 3.0).tolist(), [profile])
    assert not other.enabled and other.unmatched_profiles == 1
    assert cache.CacheRun(config, sampling.flow_sigmas(16, 1.0)).enabled


def test_chunk_cache_skips_static_chunks_and_is_exact_for_tokenwise_blocks():
    """Blocks that act on each token alone make partial recomputation exact: only the chunks
    whose input changed run, the output equals the uncached one."""
    torch.manual_seed(0)
    mlps = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4)]
    blocks = [lambda h, m=m: h + m(h) for m in mlps]
    config = cache.CacheConfig(policy="chunk", threshold=1e-6, chunk_tokens=2, max_skips=100, chunk_context=0)
    steps = 10
    run = cache.CacheRun(config, torch.linspace(1, 0, steps + 1))
    state = run.stream("video")
    h = torch.randn(1, 2 * 4 * 4, 8)  # 2 frames of 4x4 tokens: 8 chunks of 2x2 tokens x 1 frame
    with torch.no_grad():
        for step in range(steps - 1):
            moved = h.clone()
            moved[:, 5] += 0.1 * (step + 1)  # one token of frame 0, chunk (0, 1, 0), moves
            state.begin(step, steps, 1 - step / steps, (2, 4, 4))
            out = cache.run_block_chain(state, moved, blocks)
            expected = moved
            for block in blocks:
                expected = block(expected)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # from step 1 on, 7 of the 8 chunks are static: skipped in the 3 blocks after the first
    assert run.stats.chunks_skipped == 7 * 3 * (steps - 2)  # steps 1..8 (0 fills the cache)
    assert cache.chunk_map((2, 4, 4), 2, 1).tolist()[:8] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown cache policy"):
        cache.CacheConfig(policy="teacache")
    with pytest.raises(ValueError, match="start <= end"):
        cache.CacheConfig(start=0.8, end=0.2)


def test_step_cache_extrapolation_is_exact_on_a_linear_trajectory_and_measures_its_error():
    """An output linear in sigma is predicted exactly; the measured extrapolation error is 0, so
    every allowed step is skipped (up to max_skips) and the outputs stay exact."""
    steps = 12
    sigmas = torch.linspace(1, 0, steps + 1)
    a, b = torch.randn(2, 1, 3, generator=torch.Generator().manual_seed(0))
    run = cache.CacheRun(cache.CacheConfig(threshold=1e-3, max_skips=3), sigmas)
    state = run.stream("cond")
    calls = []
    for step in range(steps):
        sigma = float(sigmas[step])
        out = state.run(torch.full((1, 3), sigma), sigma, step, steps, lambda sigma=sigma: calls.append(sigma) or a + b * sigma)
        torch.testing.assert_close(out, a + b * sigma, rtol=0, atol=1e-5)
    # steps 0-2 compute (the error rate needs a prediction to check it against), 3-5 skip, 6
    # computes (max_skips), 7-9 skip, 10 computes, 11 is the last step
    assert run.stats.steps_skipped == 6 and len(calls) == 6


def test_deep_cache_state_skips_on_small_shallow_change_only():
    config = cache.CacheConfig(policy="block", threshold=0.1, max_skips=2)
    run = cache.CacheRun(config, torch.linspace(1, 0, 11))
    state = run.stream("cond", deep=True)
    shallow = torch.ones(1, 4, 2, 2)
    state.computed(0.9, shallow, torch.zeros(1, 8, 2, 2), blocks=5)
    assert state.decide(shallow * 1.05, step=2, steps=10) is cache.Mode.SKIP
    assert state.decide(shallow * 1.5, step=2, steps=10) is cache.Mode.COMPUTE  # moved too much
    assert state.decide(shallow, step=9, steps=10) is cache.Mode.COMPUTE  # the last step
    state.skipped(5, 2)
    state.skipped(5, 2)
    assert state.decide(shallow, step=4, steps=10) is cache.Mode.COMPUTE  # max_skips reached
    assert run.stats.blocks_skipped == 6 and run.stats.blocks == 15
