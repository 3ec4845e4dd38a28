"""Tests for dreamblend/train.py: hand values, the notes' invariants, equivalence, smoke run."""

import json

import pytest
import torch
import torch.nn.functional as F

from dreamblend import train as dreamblend

pytestmark = pytest.mark.dreamblend


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models():
    """A randomly initialised toy text encoder + UNet, DDPM/DDIM schedulers (4 DDIM steps)."""
    torch.manual_seed(0)
    te, unet, train_sched, sched = dreamblend.build_models()
    sched.set_timesteps(4)
    te.requires_grad_(False).eval()
    return te, unet, train_sched, sched


def _pair(unet, seed):
    """Two frozen UNets with storing processors: `unet`'s weights and a perturbed copy."""
    early = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu")
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in dreamblend.snapshot(unet).items()}
    late = dreamblend.load_unet(state, "cpu")
    return early, late


def _inputs(te, bgs=("teal", "purple"), seed=0):
    emb = dreamblend.encode(te, dreamblend.tokenize([f"a sks square on {b}" for b in bgs]))
    null = dreamblend.encode(te, dreamblend.tokenize([""] * len(bgs)))
    z_T = torch.randn((len(bgs), 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    return emb, null, z_T


# ---------------------------------------------------------------- tier 1: hand-computed values
@pytest.mark.exercise
def test_attention_loss_matches_hand_value():
    # one layer, batch 1, heads 2, HW 1, N 2: per head sum of squares, mean over heads
    a = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])  # (2, 1, 2)
    r = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    # head 0: 0.25 + 0.25 = 0.5; head 1: 0 -> mean 0.25; a second identical layer doubles it
    loss = dreamblend.attention_loss({"l1": a, "l2": a}, {"l1": r, "l2": r}, batch=1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(0.5)
    # token weights: only the second token is guided -> head 0: 0.25, head 1: 0 -> 0.125 per layer
    w = torch.tensor([0.0, 1.0])
    assert dreamblend.attention_loss({"l1": a}, {"l1": r}, 1, token_w=w).item() == \
        pytest.approx(0.125)
    a2 = torch.tensor([[[0.2, 0.8]]])  # (1, 1, 2), batch 1 head 1
    r2 = torch.tensor([[[0.6, 0.4]]])
    assert dreamblend.attention_loss({"x": a2}, {"x": r2}, 1).item() == pytest.approx(0.32)


@pytest.mark.exercise
def test_attention_loss_is_per_sample():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4 * 2, 3, 5, generator=g)  # batch 4, heads 2
    r = torch.rand(4 * 2, 3, 5, generator=g)
    full = dreamblend.attention_loss({"l": a}, {"l": r}, batch=4)  # (4,)
    for b in range(4):
        one = dreamblend.attention_loss({"l": a[2 * b:2 * b + 2]}, {"l": r[2 * b:2 * b + 2]}, 1)
        assert full[b].item() == pytest.approx(one.item(), rel=1e-6)


@pytest.mark.exercise
def test_dreambooth_loss_with_prior_by_hand():
    pred = torch.tensor([1.0, 2.0, 0.0, 4.0]).view(4, 1, 1, 1)
    target = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(4, 1, 1, 1)
    # instance: (1 + 4) / 2 = 2.5; prior: (1 + 9) / 2 = 5; L = 2.5 + 0.5 * 5 = 5.0
    loss = dreamblend.dreambooth_loss(pred, target, n_instance=2, prior_weight=0.5)
    assert loss.item() == pytest.approx(5.0)
    assert dreamblend.dreambooth_loss(pred, target, 2, 0.0).item() == pytest.approx(2.5)
    assert dreamblend.dreambooth_loss(pred, target, 4, 1.0).item() == pytest.approx(3.75)


def test_v_target_equals_scheduler_velocity(models):
    _, _, train_sched, _ = models
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([10, 500, 990])
    ours = dreamblend.v_target(train_sched, x0, eps, t)
    assert torch.allclose(ours, train_sched.get_velocity(x0, eps, t), atol=1e-6)
    ab = train_sched.alphas_cumprod[500]
    assert torch.allclose(ours[1], ab.sqrt() * eps[1] - (1 - ab).sqrt() * x0[1], atol=1e-6)


class _LinearV(torch.nn.Module):
    """A stand-in UNet: v = mean of the text embedding (per sample), broadcast over the image."""

    def forward(self, z, t, encoder_hidden_states):
        v = encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1) * torch.ones_like(z)
        return type("Out", (), {"sample": v})()


def test_classifier_free_guidance_matches_hand_formula(models):
    _, _, _, sched = models
    sched.set_timesteps(1)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb, null = torch.full((2, 5, 8), 0.3), torch.full((2, 5, 8), -0.1)
    out, _, _ = dreamblend.sample(_LinearV(), dreamblend.AttnStore(), sched, z, emb, null, 2.5)
    v_hat = torch.full_like(z, -0.1 + 2.5 * (0.3 - (-0.1)))  # (D3) by hand: 0.9
    t = sched.timesteps[0]
    ab = sched.alphas_cumprod[t]
    x0 = (ab.sqrt() * z - (1 - ab).sqrt() * v_hat).clamp(-1, 1)  # one DDIM step to t = -1
    assert torch.allclose(out, x0, atol=1e-5)
    sched.set_timesteps(4)


# ---------------------------------------------------------------- tier 3: equivalence
def test_storing_processor_matches_diffusers_processor():
    from diffusers.models.attention_processor import Attention, AttnProcessor
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=32, heads=2, dim_head=8)
    store = dreamblend.AttnStore()
    h = torch.randn(3, 10, 16)
    ctx = torch.randn(3, 5, 32)
    for enc in (ctx, None):
        if enc is None:  # self-attention needs matching widths
            attn = Attention(query_dim=16, heads=2, dim_head=8)
        ref = AttnProcessor()(attn, h, encoder_hidden_states=enc)
        ours = dreamblend.StoringAttnProcessor(store, "x")(attn, h, encoder_hidden_states=enc)
        assert torch.allclose(ours, ref, atol=1e-6)
        if enc is not None:
            assert store.maps["x"].shape == (3 * 2, 10, 5)
            store.clear()
    assert store.maps == {}  # self-attention never stored


def test_installed_store_keeps_unet_output(models):
    te, unet, _, _ = models
    emb, _, z = _inputs(te)
    from diffusers.models.attention_processor import AttnProcessor
    plain = dreamblend.build_unet()
    plain.load_state_dict(unet.state_dict())
    plain.set_attn_processor(AttnProcessor())
    hooked, _ = dreamblend.load_unet(unet.state_dict(), "cpu")
    with torch.no_grad():
        a = dreamblend.unet_v(plain, z, 500, emb)
        b = dreamblend.unet_v(hooked, z, 500, emb)
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- tier 2: invariants
def test_stored_maps_are_distributions_over_tokens(models):
    te, unet, _, _ = models
    emb, _, z = _inputs(te)
    m, store = dreamblend.load_unet(unet.state_dict(), "cpu")
    with torch.no_grad():
        dreamblend.unet_v(m, z, 300, emb)
    assert store.maps, "no map stored"
    assert all(k.endswith("attn2.processor") for k in store.maps)  # cross-attention only
    heads = m.down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads
    assert len(store.maps) == 4  # down_blocks.1, mid_block, up_blocks.0 (x2)
    for a in store.maps.values():
        assert a.shape[0] == 2 * heads and a.shape[2] == dreamblend.N_TOKENS
        assert a.shape[1] in (64, 16)  # 8x8 and the 4x4 middle block
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5)


def test_zero_guidance_equals_plain_sampling(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 1)
    plain, _, _ = dreamblend.sample(*late, sched, z_T, emb, null, 3.0)
    _, blended, losses = dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0, lam=0.0,
                                               guided_steps=4, invert=False)
    assert losses == []
    assert torch.equal(plain, blended)
    # and with guidance on, the output does change (the guidance is not a no-op)
    _, guided, _ = dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0, lam=50.0,
                                         guided_steps=4, invert=False)
    assert (guided - plain).abs().max() > 1e-4


def test_identical_weights_give_zero_guidance_loss(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    a = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu")
    b = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu")
    plain, _, _ = dreamblend.sample(*b, sched, z_T, emb, null, 3.0)
    _, out, losses = dreamblend.dreamblend(a, b, sched, z_T, emb, null, 3.0, lam=100.0,
                                           guided_steps=4, invert=False)
    assert len(losses) == 4
    assert all(float(x.abs().max()) < 1e-10 for x in losses)
    assert torch.allclose(out, plain, atol=1e-6)


def test_guidance_changes_only_the_latent(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 2)
    before = dreamblend.snapshot(late[0])
    dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0, lam=5.0, guided_steps=4)
    assert all(p.grad is None for p in late[0].parameters())
    assert all(p.grad is None for p in te.parameters())
    after = late[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_guidance_step_lowers_the_attention_loss(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 3)
    t = sched.timesteps[1]
    _, ref_maps, _ = dreamblend.sample(*early, sched, z_T, emb, null, 3.0, record=True)
    z_new, loss0 = dreamblend.guidance_step(*late, z_T, t, emb, ref_maps[1], lam=0.05)
    _, loss1 = dreamblend.guidance_step(*late, z_new, t, emb, ref_maps[1], lam=0.0)
    assert (loss0 > 0).all()
    assert (loss1 < loss0).all()


def test_guidance_is_batch_size_independent(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te, bgs=("teal", "purple", "orange", "teal"))
    early, late = _pair(unet, 4)
    t = sched.timesteps[0]
    _, ref, _ = dreamblend.sample(*early, sched, z_T, emb, null, 3.0, record=True)
    z4, _ = dreamblend.guidance_step(*late, z_T, t, emb, ref[0], lam=10.0)
    ref1 = {k: v[:v.shape[0] // 4] for k, v in ref[0].items()}
    z1, _ = dreamblend.guidance_step(*late, z_T[:1], t, emb[:1], ref1, lam=10.0)
    assert torch.allclose(z4[:1], z1, atol=1e-5)
    assert (z1 - z_T[:1]).abs().max() > 1e-6


@pytest.mark.slow
def test_ddim_inversion_round_trip():
    """Invert-then-sample with the same model reconstructs far better than fresh noise. Uses a
    briefly pre-trained toy model (a random UNet is not a smooth enough ODE)."""
    cfg = dreamblend.Config(pre_steps=40, pre_batch=16, out_dir="unused")
    gen = dreamblend.set_seed(0)
    te, unet, train_sched, sched = dreamblend.build_models()
    for p in list(te.parameters()) + list(unet.parameters()):
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(te.parameters()) + list(unet.parameters()), lr=1e-3)
    for _ in range(cfg.pre_steps):
        x0, ids = dreamblend.make_base_batch(cfg.pre_batch, gen)
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        pred = unet(train_sched.add_noise(x0, eps, t), t,
                    encoder_hidden_states=te(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, dreamblend.v_target(train_sched, x0, eps, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    sched.set_timesteps(20)
    te.requires_grad_(False)
    m = dreamblend.load_unet(unet.state_dict(), "cpu")
    x0, ids = dreamblend.make_base_batch(4, gen)
    emb = dreamblend.encode(te, ids)
    z_T = dreamblend.ddim_invert(m[0], sched, x0, emb)
    recon, _, _ = dreamblend.sample(*m, sched, z_T, emb, emb, 1.0)
    fresh, _, _ = dreamblend.sample(*m, sched, torch.randn(z_T.shape, generator=gen), emb, emb,
                                    1.0)
    mse_recon, mse_fresh = F.mse_loss(recon, x0).item(), F.mse_loss(fresh, x0).item()
    # measured: 0.014 vs 0.57 (ratio 0.024); converting v at the wrong noise level gives 0.15
    assert mse_recon < 0.06 * mse_fresh, (mse_recon, mse_fresh)


def test_finetune_touches_only_unet_and_checkpoints_are_copies(models):
    te, unet, train_sched, _ = models
    cfg = dreamblend.Config(steps=3, checkpoints="0,1", early_step=1, log_every=10)
    u = dreamblend.build_unet()
    u.load_state_dict(unet.state_dict())
    te_before = dreamblend.snapshot(te)
    gen = torch.Generator().manual_seed(0)
    inst = dreamblend.make_subject(2, gen)
    cls = torch.zeros(2, 3, 16, 16)
    e = dreamblend.encode(te, dreamblend.tokenize(["a sks square"]))
    c = dreamblend.encode(te, dreamblend.tokenize(["a square"]))
    ckpts, losses = dreamblend.finetune(cfg, u, te, train_sched, inst, e, cls, c, gen, "cpu")
    assert sorted(ckpts) == [0, 1, 3] and len(losses) == 3
    assert all(torch.equal(te_before[k], v) for k, v in te.state_dict().items())
    key = "conv_in.weight"
    assert not torch.equal(ckpts[0][key], ckpts[3][key])  # the UNet did move
    saved = ckpts[3][key].clone()
    with torch.no_grad():
        u.conv_in.weight.add_(1.0)
    assert torch.equal(ckpts[3][key], saved)


def test_metric_sanity():
    gen = torch.Generator().manual_seed(0)
    subj = dreamblend.make_subject(4, gen)
    assert dreamblend.prompt_fidelity(subj, ["gray"] * 4) == 1.0
    assert dreamblend.prompt_fidelity(subj, ["teal"] * 4) == 0.0
    assert dreamblend.subject_fidelity(subj) > 0.9
    plain = torch.stack([dreamblend.render("square", dreamblend.OBJ_COLOURS["red"],
                                           dreamblend.BG_COLOURS[bg], 8, 8, 8)
                         for bg in ("teal", "purple", "orange")])
    assert dreamblend.prompt_fidelity(plain, ["teal", "purple", "orange"]) == 1.0
    assert dreamblend.subject_fidelity(plain) < 0.3
    assert dreamblend.diversity(plain[:1].repeat(3, 1, 1, 1)) == 0.0
    assert dreamblend.diversity(plain) > 0.5
    # diversity by hand: two images 0 and 1 everywhere -> pooled L2 = sqrt(48)
    two = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    assert dreamblend.diversity(two) == pytest.approx(48 ** 0.5, rel=1e-5)


def test_tokenize_pads_right():
    ids = dreamblend.tokenize(["a sks square", ""])
    assert ids.tolist() == [[1, 5, 2, 0, 0], [0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- tier 4: smoke run + CLI
@pytest.mark.slow
def test_quick_run_smoke_and_cache(tmp_path):
    out = dreamblend.train(dreamblend.Config(quick=True, out_dir=str(tmp_path)))
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline"}
    assert s["folder"] == "dreamblend" and s["config"]["steps"] == dreamblend.QUICK["steps"]
    assert all(set(r) == {"metric", "higher_is_better", "method", "baseline"}
               for r in s["headline"])
    pre = out["history"]["pretrain_loss"]
    assert all(map(lambda x: x == x and abs(x) < 1e3, pre + out["history"]["finetune_loss"]))
    assert sum(pre[-3:]) < sum(pre[:3])
    assert (tmp_path / "dreamblend_grid.png").is_file()
    assert s["metrics"]["pretrain_cached"] == 0.0
    # second run: loads the cached pre-trained model, same numbers
    again = dreamblend.train(dreamblend.Config(quick=True, out_dir=str(tmp_path)))
    assert again["metrics"]["pretrain_cached"] == 1.0
    strip = {k: v for k, v in out["metrics"].items() if k != "pretrain_cached"}
    assert strip == {k: v for k, v in again["metrics"].items() if k != "pretrain_cached"}


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    a = dreamblend.train(dreamblend.Config(quick=True, out_dir=str(tmp_path / "a")))
    b = dreamblend.train(dreamblend.Config(quick=True, out_dir=str(tmp_path / "b")))
    assert a["metrics"] == b["metrics"]
    c = dreamblend.train(dreamblend.Config(quick=True, seed=1, out_dir=str(tmp_path / "c")))
    assert c["history"]["pretrain_loss"] != a["history"]["pretrain_loss"]


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "-3"], "--steps"),
    (["--device", "tpu"], "invalid choice"),
    (["--checkpoints", "0,999"], "--checkpoints"),
    (["--pretrained", "some/model"], "needs --device cuda"),
])
def test_bad_arguments_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        dreamblend.main(argv)
    err = capsys.readouterr().err.strip() or str(e.value.code)
    assert e.value.code != 0 and len(err.splitlines()) == 1 and needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--pretrained", "x/y", "--device", "cuda"])
    assert "CUDA is not available" in str(e.value.code)


def test_real_scale_offline_is_one_line(tmp_path, monkeypatch):
    """The --pretrained path with (pretend) CUDA but no network stops with one clear line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--pretrained", "no-such-org/no-such-model", "--device", "cuda",
                         "--instance-dir", str(tmp_path), "--out-dir", str(tmp_path)])
    msg = str(e.value.code)
    assert "could not load" in msg and "network" in msg and len(msg.splitlines()) == 1
