"""DMD2 on one shared network: adapters, modelopt's losses, resume, NaN guard, LoRA files."""

import os

import pytest
import torch
from safetensors import safe_open

from fastgen_core import distill
from fastgen_core.networks import NULL_CLASS, DigitDiT, DigitDiTConfig, class_conditioning
from fastgen_core.recipe import RECIPE_KEY, Recipe

pytest.importorskip("modelopt.torch.fastgen")
import modelopt.torch.fastgen.methods.dmd as modelopt_dmd  # noqa: E402


def teacher_net(seed=0):
    """A tiny digit DiT with every weight random (a fresh DiT's zeroed output layer would make
    teacher, student and fake score agree exactly, and every loss zero)."""
    net = DigitDiT(DigitDiTConfig(dim=32, depth=2, heads=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def conditions(batch, generator):
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return class_conditioning(labels)[:, 0], class_conditioning([NULL_CLASS] * batch)[:, 0]


def trainer(seed=0, **settings):
    net = teacher_net()
    switch, adapters = distill.attach_lora(net, rank=4)
    options = dict(steps=4, batch=4, student_update_freq=2, lr=1e-3, fake_lr=1e-3, seed=seed) | settings
    return distill.DMDTrainer(net, switch, adapters, distill.DistillSettings(**options), conditions)


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 32, 32, generator=gen), torch.rand(3, generator=gen), conditions(3, gen)[0]


def test_teacher_student_and_fake_score_share_one_base():
    reference = teacher_net()
    x, t, c = inputs()
    expected = reference(x, t, c)
    tr = trainer()
    with torch.no_grad():
        assert torch.equal(tr.teacher(x, t, c), expected)
        assert torch.equal(tr.student(x, t, c), expected)  # zero-initialised LoRA up weights
        for adapter in tr.adapters[distill.STUDENT].values():
            adapter.up.weight.normal_()
        assert not torch.allclose(tr.student(x, t, c), expected)
        assert torch.equal(tr.teacher(x, t, c), expected) and torch.equal(tr.fake_score(x, t, c), expected)
    # one copy of the base: the views own only their adapters, the teacher nothing
    assert list(tr.teacher.parameters()) == []
    student_ids = {id(p) for p in tr.student.parameters()}
    assert student_ids and student_ids.isdisjoint({id(p) for p in tr.fake_score.parameters()})
    base = sum(p.numel() for name, p in tr.net.named_parameters() if ".adapters." not in name)
    assert base == sum(p.numel() for p in reference.parameters())


def test_losses_come_from_modelopt(monkeypatch):
    calls = {"vsd": 0, "dsm": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(modelopt_dmd, "vsd_loss", counted("vsd", modelopt_dmd.vsd_loss))
    monkeypatch.setattr(modelopt_dmd, "dsm_loss", counted("dsm", modelopt_dmd.dsm_loss))
    tr = trainer()
    before = {k: v.clone() for k, v in distill.lora_state_dict(tr.adapters[distill.STUDENT]).items()}
    for _ in range(4):
        record = tr.train_step()
        assert record["fake_score"] > 0
    assert calls == {"vsd": 2, "dsm": 4}  # fake score every iteration, student every second
    after = distill.lora_state_dict(tr.adapters[distill.STUDENT])
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student did not train"


def test_resume_continues_to_bit_identical_weights(tmp_path):
    straight = trainer()
    straight.run(6)
    interrupted = trainer()
    path = str(tmp_path / "student.resume.pt")
    assert interrupted.run(6, checkpoint_path=path, should_stop=lambda: interrupted.iteration == 3) == "stopped"
    resumed = trainer(seed=123)  # a different seed: everything must come from the checkpoint
    resumed.load_checkpoint(path)
    assert resumed.iteration == 3
    assert resumed.run(6) == "done"
    for name in (distill.STUDENT, distill.FAKE):
        a, b = distill.lora_state_dict(straight.adapters[name]), distill.lora_state_dict(resumed.adapters[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["fake_score"] for r in straight.history] == [r["fake_score"] for r in resumed.history]


def test_resume_refuses_another_rank_or_model_before_training(tmp_path):
    """A saved state that does not fit the run is refused with its cause and what to do, not with
    a tensor-size error from inside the optimizer."""
    path = str(tmp_path / "run.fastgen-resume")
    saved = trainer()
    assert saved.saved_iteration is None
    saved.run(2, checkpoint_path=path)
    assert saved.saved_iteration == 2  # what a failure after training names
    state = distill.read_checkpoint(path)
    assert distill.checkpoint_rank(state) == 4

    net = teacher_net()
    switch, adapters = distill.attach_lora(net, rank=8)
    other_rank = distill.DMDTrainer(net, switch, adapters, distill.DistillSettings(steps=4, batch=4), conditions)
    with pytest.raises(ValueError, match=r"run.fastgen-resume was trained at lora_rank 4 \(stopped at iteration 2\), "
                                         r"and this run asks for rank 8: set lora_rank to 4"):
        other_rank.load_checkpoint(path)
    assert other_rank.iteration == 0

    wider = DigitDiT(DigitDiTConfig(dim=64, depth=2, heads=2))
    switch, adapters = distill.attach_lora(wider, rank=4)
    other_model = distill.DMDTrainer(wider, switch, adapters, distill.DistillSettings(steps=4, batch=4), conditions)
    with pytest.raises(ValueError, match=r"was saved for another model: its student LoRA's blocks.0.qkv.lora_down.weight "
                                         r"is \[4, 32\], this model's is \[4, 64\]"):
        other_model.load_checkpoint(path)


def test_unreadable_training_states_are_refused_naming_the_file(tmp_path):
    damaged = tmp_path / "cut.fastgen-resume"
    damaged.write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(ValueError, match="cut.fastgen-resume is not a readable FastGen training state"):
        distill.read_checkpoint(str(damaged))
    good = tmp_path / "good.fastgen-resume"
    trainer().run(2, checkpoint_path=str(good))
    state = torch.load(good, weights_only=True)
    state["iteration"] = 10**9
    edited = tmp_path / "edited.fastgen-resume"
    torch.save(state, edited)
    with pytest.raises(ValueError, match="edited.fastgen-resume: its iteration count and loss history do not agree"):
        distill.read_checkpoint(str(edited))
    foreign = tmp_path / "foreign.fastgen-resume"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.fastgen-resume is not a FastGen DMD training state"):
        distill.read_checkpoint(str(foreign))


def test_resume_trains_at_this_runs_learning_rate(tmp_path):
    """The optimizer states carry the saved run's learning rate; the node's own input wins."""
    path = str(tmp_path / "lr.fastgen-resume")
    trainer(lr=1e-3).run(2, checkpoint_path=path)
    resumed = trainer(lr=5e-5, fake_lr=2e-4)
    resumed.load_checkpoint(path)
    assert [g["lr"] for g in resumed.student_opt.param_groups] == [5e-5]
    assert [g["lr"] for g in resumed.fake_opt.param_groups] == [2e-4]


def test_non_finite_loss_stops_with_the_last_good_weights(monkeypatch):
    tr = trainer()
    tr.run(2)
    good = {k: v.clone() for k, v in distill.lora_state_dict(tr.adapters[distill.FAKE]).items()}
    monkeypatch.setattr(modelopt_dmd, "dsm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(distill.NonFiniteLoss, match="fake-score loss became nan at iteration 2"):
        tr.run(4)
    now = distill.lora_state_dict(tr.adapters[distill.FAKE])
    assert all(torch.equal(good[k], now[k]) for k in good)


def test_lora_file_has_comfy_keys_and_recipe_and_is_written_atomically(tmp_path, monkeypatch):
    tr = trainer()
    recipe = distill.student_recipe(tr.settings, family="fastgen-digits", teacher="digit_teacher")
    assert recipe.timesteps == [999, 750, 500, 250] and recipe.cfg == 1.0 and recipe.sampler == "multistep_sde"
    path = str(tmp_path / "student.safetensors")
    distill.save_lora(path, tr.adapters[distill.STUDENT], recipe)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert Recipe.from_json(f.metadata()[RECIPE_KEY]) == recipe
    assert "diffusion_model.blocks.0.qkv.lora_up.weight" in keys and "diffusion_model.blocks.1.fc2.alpha" in keys
    assert len(keys) == 2 * 4 * 3  # 2 blocks x (qkv, proj, fc1, fc2) x (up, down, alpha)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(distill, "save_file", crash)
    with pytest.raises(OSError):
        distill.save_lora(str(tmp_path / "other.safetensors"), tr.adapters[distill.STUDENT], recipe)
    assert sorted(os.listdir(tmp_path)) == ["student.safetensors"]


def test_detach_lora_restores_the_original_network():
    net = teacher_net()
    x, t, c = inputs()
    expected = net(x, t, c)
    linears = {name: type(m) for name, m in net.named_modules()}
    switch, adapters = distill.attach_lora(net, rank=4)
    for adapter in adapters[distill.STUDENT].values():
        torch.nn.init.normal_(adapter.up.weight)
    with switch.use(distill.STUDENT), torch.no_grad():
        assert not torch.allclose(net(x, t, c), expected)
    distill.detach_lora(net)
    assert {name: type(m) for name, m in net.named_modules()} == linears
    with switch.use(distill.STUDENT), torch.no_grad():
        assert torch.equal(net(x, t, c), expected)


def test_gradient_checkpointing_gives_the_same_gradients_through_each_adapter():
    """Checkpointed blocks recompute in the backward pass, after the adapter context has closed:
    the student's and the fake score's gradients must still be their own, equal to the plain ones."""
    def grads(checkpointing):
        tr = trainer()
        for adapter in tr.adapters[distill.STUDENT].values():
            torch.nn.init.normal_(adapter.up.weight, std=0.1, generator=torch.Generator().manual_seed(3))
        if checkpointing:
            assert distill.enable_gradient_checkpointing(tr.net, tr.switch) == 2
        x, t, c = inputs()
        out = {}
        for view in (tr.student, tr.fake_score):
            view.zero_grad()
            view(x, t, c).square().mean().backward()
            out[view.adapter] = [p.grad.clone() for p in view.parameters()]
        return out

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[name], checkpointed[name], strict=True)), name
        assert any(g.abs().sum() > 0 for g in checkpointed[name]), f"{name} got no gradient"


def test_gradient_checkpointing_is_removed_again_and_needs_blocks():
    tr = trainer()
    distill.enable_gradient_checkpointing(tr.net, tr.switch)
    distill.disable_gradient_checkpointing(tr.net)
    assert not any("forward" in m.__dict__ for m in tr.net.modules())
    with pytest.raises(ValueError, match="no block list"):
        distill.enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)), tr.switch)


def test_ema_student_is_tracked_resumed_and_published(tmp_path):
    straight = trainer(ema_decay=0.9)
    straight.run(6)
    live = {k: v.clone() for k, v in distill.lora_state_dict(straight.adapters[distill.STUDENT]).items()}
    interrupted = trainer(ema_decay=0.9)
    path = str(tmp_path / "ema.resume.pt")
    interrupted.run(6, checkpoint_path=path, should_stop=lambda: interrupted.iteration == 3)
    resumed = trainer(ema_decay=0.9)
    resumed.load_checkpoint(path)
    resumed.run(6)
    straight.publish_ema()
    resumed.publish_ema()
    published = distill.lora_state_dict(straight.adapters[distill.STUDENT])
    assert any(not torch.equal(live[k], published[k]) for k in live), "EMA weights equal the live ones"
    again = distill.lora_state_dict(resumed.adapters[distill.STUDENT])
    assert all(torch.equal(published[k], again[k]) for k in published), "EMA state did not survive the resume"


def test_fake_score_times_stay_in_the_teacher_range(monkeypatch):
    seen = []
    tr = trainer(t_range=(0.2, 0.6))
    original = tr.pipeline._call_model

    def spy(*args, **kwargs):
        seen.append(kwargs["timestep"] if "timestep" in kwargs else args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(tr.pipeline, "_call_model", spy)
    tr.pipeline.compute_fake_score_loss(torch.zeros(4, 3, 32, 32), torch.randn(4, 3, 32, 32), conditions(4, None)[0])
    drawn = seen[-1].detach().flatten()  # the fake-score call (the calls before it simulate the student)
    assert drawn.min() >= 0.2 - 1e-6 and drawn.max() <= 0.6 + 1e-6


def real_digits(batch, generator):
    """Stand-in real data: fixed blobs with their class conditioning (shape is what matters here)."""
    labels = torch.randint(0, 10, (batch,), generator=generator)
    images = torch.randn(batch, 3, 32, 32, generator=generator).clamp(-1, 1)
    return images, class_conditioning(labels)[:, 0]


def gan_trainer(seed=0, checkpointing=False):
    net = teacher_net()
    switch, adapters = distill.attach_lora(net, rank=4)
    if checkpointing:
        distill.enable_gradient_checkpointing(net, switch)
    settings = distill.DistillSettings(steps=4, batch=4, student_update_freq=2, lr=1e-3, fake_lr=1e-3, seed=seed, gan_weight=0.1,
                                       gan_r1_weight=10.0)
    return distill.DMDTrainer(net, switch, adapters, settings, conditions, real_data=real_digits, feature_grid=(8, 8))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gan_head_trains_on_teacher_features_through_modelopt(monkeypatch, checkpointing):
    calls = {"gen": 0, "disc": 0}
    for name, key in (("gan_gen_loss", "gen"), ("gan_disc_loss", "disc")):
        original = getattr(modelopt_dmd, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(modelopt_dmd, name, counted)
    tr = gan_trainer(checkpointing=checkpointing)  # recomputed blocks must not record features twice
    before = {k: v.clone() for k, v in tr.discriminator.state_dict().items()}
    records = [tr.train_step() for _ in range(4)]
    assert calls == {"gen": 2, "disc": 4}
    assert all(np_finite(r["discriminator"]) for r in records) and "gan_gen" in records[0]
    assert any(not torch.equal(before[k], v) for k, v in tr.discriminator.state_dict().items()), "discriminator did not train"
    assert tr.teacher._fastgen_captured == [], "captured features were left undrained"
    tr.close()
    x, t, c = inputs()
    with torch.no_grad():
        tr.teacher(x, t, c)
    assert tr.teacher._fastgen_captured == [], "the feature hook outlived close()"


def np_finite(value):
    return value == value and abs(value) != float("inf")


def test_gan_resume_is_bit_identical_and_needs_real_data(tmp_path):
    straight = gan_trainer()
    straight.run(4)
    interrupted = gan_trainer()
    path = str(tmp_path / "gan.resume.pt")
    interrupted.run(4, checkpoint_path=path, should_stop=lambda: interrupted.iteration == 2)
    resumed = gan_trainer(seed=9)
    resumed.load_checkpoint(path)
    resumed.run(4)
    a, b = straight.discriminator.state_dict(), resumed.discriminator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    net = teacher_net()
    switch, adapters = distill.attach_lora(net, rank=4)
    with pytest.raises(ValueError, match="needs real data"):
        distill.DMDTrainer(net, switch, adapters, distill.DistillSettings(gan_weight=0.1), conditions)


def test_student_command_runs_the_gan_term_on_real_digits():
    from fastgen_core.train import train_student

    student, recipe, tr = train_student(student_steps=2, batch=4, rank=4, update_freq=2, gan_weight=0.01, iterations=3, log=lambda *_: None)
    assert [("discriminator" in r, "gan_gen" in r) for r in tr.history] == [(True, True), (True, False), (True, True)]
    assert all(np_finite(r["discriminator"]) for r in tr.history)
    assert recipe.steps == 2 and tr._gan_hook is None


def test_training_state_and_partial_writes_are_not_named_like_models(tmp_path):
    """The host lists model folders by extension: the resume state and an interrupted write must
    not show up in LoRA dropdowns (a state saved under the old .resume.pt name is moved)."""
    from fastgen_core.files import atomic_path

    model_extensions = {".safetensors", ".pt", ".pt2", ".ckpt", ".pth", ".bin", ".pkl", ".sft"}
    lora = str(tmp_path / "student.safetensors")
    assert os.path.splitext(distill.default_checkpoint_path(lora))[1] not in model_extensions
    with atomic_path(lora) as tmp:
        assert os.path.splitext(tmp)[1] not in model_extensions and os.path.dirname(tmp) == str(tmp_path)
    legacy = tmp_path / "old.resume.pt"
    legacy.write_bytes(b"state")
    moved = distill.default_checkpoint_path(str(tmp_path / "old.safetensors"))
    assert not legacy.exists() and open(moved, "rb").read() == b"state"


# --- the fp16 / bf16 teacher a GPU host runs (the first GPU run failed: fp32 adapters on fp16 activations)


class HalfPrecisionHost(torch.nn.Module):
    """A network held as a GPU host holds it: weights in `dtype`, inputs cast to it, the output
    returned in fp32 (ComfyUI's BaseModel.apply_model does the same)."""

    def __init__(self, net, dtype):
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype

    def forward(self, x, t, c=None, **kwargs):
        c = c.to(self.dtype) if c is not None else None
        return self.net(x.to(self.dtype), t.to(self.dtype), c, **kwargs).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dmd_trains_fp32_adapters_on_a_half_precision_teacher(dtype):
    host = HalfPrecisionHost(teacher_net(), dtype)
    switch, adapters = distill.attach_lora(host.net, rank=4)
    settings = distill.DistillSettings(steps=2, batch=2, student_update_freq=1, lr=1e-2, fake_lr=1e-2, seed=0)
    trainer = distill.DMDTrainer(host, switch, adapters, settings, conditions)
    before = {k: v.clone() for k, v in distill.lora_state_dict(adapters[distill.STUDENT]).items()}
    for _ in range(2):
        record = trainer.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for k, v in record.items() if k != "iteration")
    after = distill.lora_state_dict(adapters[distill.STUDENT])
    assert all(a.dtype == torch.float32 for a in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student adapters did not train"
    assert all(p.dtype == dtype for name, p in host.net.named_parameters() if ".adapters." not in name)
