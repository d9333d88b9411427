"""Self-forcing DMD for the world model (#8): the DMD losses run on chunks whose context the student
rolled out itself; the student LoRA merges into a plain model that samples like the LoRA."""

import torch

from fastgen_core import data, distill, networks, self_forcing, world


def tiny_world_model(seed=0):
    config = networks.CausalWorldDiTConfig(dim=32, depth=1, heads=2, camera_motion=data.camera_motion())
    net = networks.CausalWorldDiT(config).init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random gates: the adaLN-Zero start would make every output 0
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def test_chunk_denoiser_equals_the_cached_rollout_view():
    """What DMD trains (one pass over context + chunk) is what the live loop computes (the cached
    chunk after the context was written)."""
    net = tiny_world_model()
    frames, actions = data.game_episode(3, 8)
    context, chunk = frames[:4].transpose(0, 1)[None], torch.randn(1, 3, 4, 64, 64)
    t = torch.tensor([0.6])
    with torch.no_grad():
        one_pass = self_forcing.ChunkDenoiser(net)(chunk, t, (context, actions[None]))
        cache = world.KVCache()
        net(context, torch.zeros(1, 4), actions[None, :4], cache, write_cache=True)
        cached = net(chunk, t.expand(1, 4), actions[None, 4:], cache)
    assert (one_pass - cached).abs().max() < 1e-4


def test_self_forcing_trains_on_its_own_rollouts_and_merges():
    net = tiny_world_model()
    base_params = sum(p.numel() for p in net.parameters())
    settings = self_forcing.SelfForcingSettings(steps=2, batch=2, episodes=2, context_chunks=1, student_update_freq=1)
    trainer, switch, adapters = self_forcing.world_trainer(net, settings)
    assert list(trainer.teacher.parameters()) == [], "the teacher is the shared base, not a copy"
    records = [trainer.train_step() for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(r["fake_score"])) and torch.isfinite(torch.tensor(r["vsd"])) for r in records)
    assert trainer.contexts.rollouts > 0, "no iteration trained on a context the student generated"
    moved = sum(a.up.weight.abs().sum().item() for a in adapters[distill.STUDENT].values())
    assert moved > 0, "the student LoRA did not train"
    # merged: the plain model gives what the student adapter gave
    frames, actions = data.game_episode(5, 8)
    x = torch.cat([frames[:4].transpose(0, 1)[None], torch.randn(1, 3, 4, 64, 64)], 2)
    sigma = torch.cat([torch.zeros(1, 4), torch.full((1, 4), 0.5)], 1)
    with torch.no_grad(), switch.use(distill.STUDENT):
        with_lora = net.forward_sequence(x, sigma, actions[None], 4)
    student = self_forcing.merged_student(net, adapters)
    assert not any(isinstance(m, distill.LoRALinear) for m in student.modules())
    assert sum(p.numel() for p in student.parameters()) == base_params
    with torch.no_grad():
        merged = student.forward_sequence(x, sigma, actions[None], 4)
    assert (merged - with_lora).abs().max() < 1e-4
