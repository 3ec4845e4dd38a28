"""Tests for dreamblend/train.py: hand values, the notes' invariants, the samplers' wiring,
equivalence with diffusers, the per-image metrics, a smoke run, and the real-scale path run
offline on a tiny Stable Diffusion folder made here with save_pretrained."""

import dataclasses
import inspect
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


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records every latent and timestep it is called with and returns
    `fn(z, t, emb)`."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, z, t, encoder_hidden_states):
        self.calls.append((z.detach().clone(), int(t[0])))
        return _Out(self.fn(z, t, encoder_hidden_states))


def _plain_sched(n, kind="v_prediction"):
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                      prediction_type=kind, clip_sample=False)
    s.set_timesteps(n)
    return s


# ---------------------------------------------------------------- tier 1: hand-computed values
@pytest.mark.exercise(1)
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
    # batch 2, heads 2, laid out sample-major (s0h0, s0h1, s1h0, s1h1): squared norms
    # 1, 1, 0, 0 -> sample 0 averages its two heads to 1, sample 1 to 0. Grouping the heads with
    # view(-1, batch) would mix the samples and give 0.5 and 0.5.
    a3 = torch.tensor([[[1.0]], [[1.0]], [[0.0]], [[0.0]]])  # (4, 1, 1)
    loss3 = dreamblend.attention_loss({"x": a3}, {"x": torch.zeros_like(a3)}, batch=2)
    torch.testing.assert_close(loss3, torch.tensor([1.0, 0.0]))


@pytest.mark.exercise(1)
def test_attention_loss_is_per_sample():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4 * 2, 3, 5, generator=g)  # batch 4, heads 2
    r = torch.rand(4 * 2, 3, 5, generator=g)
    full = dreamblend.attention_loss({"l": a}, {"l": r}, batch=4)  # (4,)
    for b in range(4):
        one = dreamblend.attention_loss({"l": a[2 * b:2 * b + 2]}, {"l": r[2 * b:2 * b + 2]}, 1)
        assert full[b].item() == pytest.approx(one.item(), rel=1e-6)
        # and it is the squared Frobenius norm (a sum over HW and N), averaged over heads
        want = ((a[2 * b:2 * b + 2] - r[2 * b:2 * b + 2]) ** 2).sum((1, 2)).mean()
        assert full[b].item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.exercise(2)
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


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_to_x0_eps_inverts_the_noising(kind):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ab = torch.tensor(0.3)
    z = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    out = ab.sqrt() * eps - (1 - ab).sqrt() * x0 if kind == "v_prediction" else eps
    x0_hat, eps_hat = dreamblend.to_x0_eps(z, out, ab, kind)
    assert torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)


def test_classifier_free_guidance_matches_hand_formula(models):
    _, _, _, sched = models
    sched.set_timesteps(1)
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb, null = torch.full((2, 5, 8), 0.3), torch.full((2, 5, 8), -0.1)
    fake = _Recorder(lambda z, t, e: e.mean((1, 2)).view(-1, 1, 1, 1) * torch.ones_like(z))
    out, maps = dreamblend.ddim_sample(fake, dreamblend.AttnStore(), sched, z, emb, null, 2.5)
    assert maps is None
    v_hat = torch.full_like(z, -0.1 + 2.5 * (0.3 - (-0.1)))  # (D3) by hand: 0.9
    t = sched.timesteps[0]
    ab = sched.alphas_cumprod[t]
    x0 = (ab.sqrt() * z - (1 - ab).sqrt() * v_hat).clamp(-1, 1)  # one DDIM step to t = -1
    assert torch.allclose(out, x0, atol=1e-5)
    sched.set_timesteps(4)


def test_curve_value_by_hand():
    pts = [(1.0, 0.1), (0.5, 0.3), (0.0, 0.9)]
    assert dreamblend.curve_value(pts, 1.0) == pytest.approx(0.1)
    assert dreamblend.curve_value(pts, 0.75) == pytest.approx(0.3)  # (0,.9)-(1,.1) beats .2
    concave = [(1.0, 0.1), (0.5, 0.6), (0.0, 0.7)]
    assert dreamblend.curve_value(concave, 0.75) == pytest.approx(0.35)  # (.5,.6)-(1,.1)
    # the envelope, not the polyline: (0, .9)-(1, .1) gives 0.5 at p = 0.5, above 0.3
    assert dreamblend.curve_value(pts, 0.5) == pytest.approx(0.5)
    assert dreamblend.curve_value([(0.6, 0.4)], 0.2) == pytest.approx(0.4)  # dominated
    assert dreamblend.curve_value([(0.6, 0.4)], 0.9) == 0.0  # nothing reaches p


# ---------------------------------------------------------------- tier 1b: per-image metrics
def _render(bg, subject=True, obj_colour="red"):
    if subject:
        return dreamblend.render("square", None, dreamblend.BG_COLOURS[bg], 8, 8, 8, checker=True)
    return dreamblend.render("square", dreamblend.OBJ_COLOURS[obj_colour],
                             dreamblend.BG_COLOURS[bg], 8, 8, 8)


def test_metrics_are_not_fooled_by_a_blank_image():
    blank = dreamblend.BG_COLOURS["teal"]
    imgs = torch.stack([torch.tensor(blank)[:, None, None].expand(3, 16, 16),  # blank teal
                        _render("teal"),  # the subject on teal: the goal
                        _render("gray"),  # the subject on the wrong background
                        _render("teal", subject=False)])  # a plain red square on teal
    s = dreamblend.toy_scores(imgs, ["teal"] * 4)
    assert s["bg"].tolist() == [1, 1, 0, 1]
    assert s["object"].tolist() == [0, 1, 1, 1]
    assert s["prompt_fid"].tolist() == [0, 1, 0, 1]  # the blank image fails prompt fidelity
    assert s["subject_rate"].tolist() == [0, 1, 1, 0]
    assert s["both"].tolist() == [0, 1, 0, 0]  # only the subject on the right background
    assert s["subject_fid"][1] > 0.9 and s["subject_fid"][3] < 0.3
    summ = dreamblend.summarise(s, imgs, 1)
    assert summ["both"] == pytest.approx(0.25) and summ["prompt_fid"] == pytest.approx(0.5)


def test_metric_sanity():
    gen = torch.Generator().manual_seed(0)
    subj = dreamblend.make_subject(4, gen)
    assert dreamblend.prompt_fidelity(subj, ["gray"] * 4) == 1.0
    assert dreamblend.prompt_fidelity(subj, ["teal"] * 4) == 0.0
    assert dreamblend.subject_fidelity(subj) > 0.9
    plain = torch.stack([_render(bg, subject=False) for bg in ("teal", "purple", "orange")])
    assert dreamblend.prompt_fidelity(plain, ["teal", "purple", "orange"]) == 1.0
    assert dreamblend.subject_fidelity(plain) < 0.3
    assert dreamblend.diversity(plain[:1].repeat(3, 1, 1, 1)) == 0.0
    assert dreamblend.diversity(plain) > 0.5
    # diversity by hand: two images 0 and 1 everywhere -> pooled L2 = sqrt(48)
    two = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    assert dreamblend.diversity(two) == pytest.approx(48 ** 0.5, rel=1e-5)


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


def test_storing_processor_matches_diffusers_with_group_norm():
    """A VAE-style attention block (group norm, 4-D input, residual): keys and values must come
    from the group-normed input, as in diffusers."""
    from diffusers.models.attention_processor import Attention, AttnProcessor
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, norm_num_groups=4,
                     residual_connection=True, bias=True, upcast_softmax=True,
                     _from_deprecated_attn_block=True)
    assert attn.group_norm is not None
    with torch.no_grad():  # a non-trivial norm, so that normed and raw inputs differ a lot
        attn.group_norm.weight.normal_()
        attn.group_norm.bias.normal_()
    h = 3.0 * torch.randn(2, 16, 4, 4) + 1.0  # (B, C, H, W)
    ref = AttnProcessor()(attn, h)
    ours = dreamblend.StoringAttnProcessor(dreamblend.AttnStore(), "vae")(attn, h)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_installed_store_keeps_unet_output(models):
    te, unet, _, _ = models
    emb, _, z = _inputs(te)
    from diffusers.models.attention_processor import AttnProcessor
    plain = dreamblend.build_unet()
    plain.load_state_dict(unet.state_dict())
    plain.set_attn_processor(AttnProcessor())
    hooked, _ = dreamblend.load_unet(unet.state_dict(), "cpu")
    with torch.no_grad():
        a = dreamblend.model_out(plain, z, 500, emb)
        b = dreamblend.model_out(hooked, z, 500, emb)
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- tier 2: invariants and wiring
def test_stored_maps_are_distributions_over_tokens(models):
    te, unet, _, _ = models
    emb, _, z = _inputs(te)
    m, store = dreamblend.load_unet(unet.state_dict(), "cpu")
    with torch.no_grad():
        dreamblend.model_out(m, z, 300, emb)
    assert store.maps, "no map stored"
    assert all(k.endswith("attn2.processor") for k in store.maps)  # cross-attention only
    heads = m.down_blocks[1].attentions[0].transformer_blocks[0].attn2.heads
    assert len(store.maps) == 4  # down_blocks.1, mid_block, up_blocks.0 (x2)
    for a in store.maps.values():
        assert a.shape[0] == 2 * heads and a.shape[2] == dreamblend.N_TOKENS
        assert a.shape[1] in (64, 16)  # 8x8 and the 4x4 middle block
        assert (a >= 0).all()
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:2]), atol=1e-5)


def test_recorded_maps_are_the_conditional_branch_per_step(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    m = dreamblend.load_unet(unet.state_dict(), "cpu")
    _, maps = dreamblend.ddim_sample(*m, sched, z_T, emb, null, 3.0, record=True)
    assert len(maps) == len(sched.timesteps)
    # step 0 is the first call on z_T: the conditional maps, not the empty prompt's
    with torch.no_grad():
        m[1].clear()
        dreamblend.model_out(m[0], z_T, sched.timesteps[0], emb)
        cond = dict(m[1].maps)
        dreamblend.model_out(m[0], z_T, sched.timesteps[0], null)
        uncond = dict(m[1].maps)
    k = next(iter(cond))
    assert torch.allclose(maps[0][k], cond[k]) and not torch.allclose(maps[0][k], uncond[k])


def test_cfg_pass_sees_the_latent_after_the_guidance_step(monkeypatch):
    """(D2) then (D3): the CFG predictions and the DDIM step use the moved latent."""
    sched = _plain_sched(1)
    moved = []

    def fake_guidance(unet, store, z, t, emb, ref_maps, lam, token_w=None):
        moved.append(z + 7.0)
        return z + 7.0, torch.zeros(len(z))

    monkeypatch.setattr(dreamblend, "guidance_step", fake_guidance)
    fake = _Recorder(lambda z, t, e: torch.zeros_like(z))  # v = 0
    z0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.zeros(2, 5, 8)
    out, losses = dreamblend.guided_sample(fake, dreamblend.AttnStore(), sched, z0, emb, emb,
                                           2.0, [{}], lam=1.0, guided_steps=1)
    assert len(moved) == 1 and len(losses) == 1
    assert len(fake.calls) == 2  # conditional + unconditional pass, both on the moved latent
    assert all(torch.equal(z, z0 + 7.0) for z, _ in fake.calls)
    ab = sched.alphas_cumprod[sched.timesteps[0]]
    assert torch.allclose(out, ab.sqrt() * (z0 + 7.0), atol=1e-5)  # x0 = sqrt(ab) z - 0
    # with the guidance off (past guided_steps) the CFG pass sees the latent unmoved
    fake.calls.clear()
    dreamblend.guided_sample(fake, dreamblend.AttnStore(), sched, z0, emb, emb, 2.0, [{}],
                             lam=1.0, guided_steps=0)
    assert all(torch.equal(z, z0) for z, _ in fake.calls)


def test_inversion_uses_the_late_checkpoint_and_feeds_the_guided_sampler(models, monkeypatch):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 5)
    seen = {}
    marker = torch.full_like(z_T, 0.25)

    def spy(u, s, x0, e):
        seen["unet"], seen["x0"] = u, x0
        return marker

    monkeypatch.setattr(dreamblend, "ddim_invert", spy)
    ref, out, _ = dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0, lam=0.0,
                                        guided_steps=4, invert=True)
    assert seen["unet"] is late[0]  # (C1): the late checkpoint inverts ...
    assert torch.equal(seen["x0"], ref)  # ... the early checkpoint's reference image
    early_img, _ = dreamblend.ddim_sample(*early, sched, z_T, emb, null, 3.0)
    assert torch.equal(ref, early_img)
    from_marker, _ = dreamblend.ddim_sample(*late, sched, marker, emb, null, 3.0)
    assert torch.equal(out, from_marker)  # (D) starts from the inversion, with the late model


def test_dreamblend_default_inversion_matches_config():
    default = inspect.signature(dreamblend.dreamblend).parameters["invert"].default
    assert default == dreamblend.Config().invert


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_inversion_runs_all_its_steps(kind):
    """With a model that always predicts the same noise eps*, DDIM inversion from x0 must land on
    sqrt(ab_T) x0' + sqrt(1 - ab_T) eps* at T = the first sampling timestep, with x0' the clean
    image seen at level 0; one model call per step, at every level but the last."""
    sched = _plain_sched(5, kind)
    ab = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    eps_star, x0 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)

    def predict(z, t, e):
        a = ab[int(t[0])]
        if kind == "v_prediction":  # the v whose eps is eps*: eps = sqrt(1-a) z + sqrt(a) v
            return (eps_star - (1 - a).sqrt() * z) / a.sqrt()
        return eps_star.expand_as(z)

    fake = _Recorder(predict)
    z_T = dreamblend.ddim_invert(fake, sched, x0, None)
    ts = sched.timesteps.tolist()
    assert [t for _, t in fake.calls] == ts[::-1][:-1]  # 0, 200, ..., every level but T
    a0, aT = ab[ts[-1]], ab[ts[0]]
    x0p = (x0 - (1 - a0).sqrt() * eps_star) / a0.sqrt()
    assert torch.allclose(z_T, aT.sqrt() * x0p + (1 - aT).sqrt() * eps_star, atol=1e-4)


def test_zero_guidance_equals_plain_sampling(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 1)
    plain, _ = dreamblend.ddim_sample(*late, sched, z_T, emb, null, 3.0)
    _, blended, losses = dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0, lam=0.0,
                                               guided_steps=4, invert=False)
    assert losses == []
    assert torch.equal(plain, blended)
    # and with guidance on, the output does change (the guidance is not a no-op)
    _, guided, _ = dreamblend.dreamblend(early, late, sched, z_T, emb, null, 3.0,
                                         lam=dreamblend.Config().guidance_lr, guided_steps=4,
                                         invert=False)
    assert (guided - plain).abs().max() > 1e-4


def test_identical_weights_give_zero_guidance_loss(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    a = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu")
    b = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu")
    plain, _ = dreamblend.ddim_sample(*b, sched, z_T, emb, null, 3.0)
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
    _, ref_maps = dreamblend.ddim_sample(*early, sched, z_T, emb, null, 3.0, record=True)
    z_new, loss0 = dreamblend.guidance_step(*late, z_T, t, emb, ref_maps[1], lam=0.05)
    _, loss1 = dreamblend.guidance_step(*late, z_new, t, emb, ref_maps[1], lam=0.0)
    assert (loss0 > 0).all()
    assert (loss1 < loss0).all()


def test_guidance_is_batch_size_independent(models):
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te, bgs=("teal", "purple", "orange", "teal"))
    early, late = _pair(unet, 4)
    t = sched.timesteps[0]
    _, ref = dreamblend.ddim_sample(*early, sched, z_T, emb, null, 3.0, record=True)
    lam = dreamblend.Config().guidance_lr  # per-sample normalisation and halving
    z4, _ = dreamblend.guidance_step(*late, z_T, t, emb, ref[0], lam=lam)
    ref1 = {k: v[:v.shape[0] // 4] for k, v in ref[0].items()}
    z1, _ = dreamblend.guidance_step(*late, z_T[:1], t, emb[:1], ref1, lam=lam)
    assert torch.allclose(z4[:1], z1, atol=1e-5)
    assert (z1 - z_T[:1]).abs().max() > 1e-6


@pytest.mark.slow
def test_ddim_inversion_round_trip():
    """Invert-then-sample with the same model reconstructs far better than fresh noise. Uses a
    briefly pre-trained toy model (a random UNet is not a smooth enough ODE)."""
    cfg = dreamblend.Config(pre_steps=25, pre_batch=16, out_dir="unused")
    gen = dreamblend.set_seed(0)
    te, unet, train_sched, sched = dreamblend.build_models()
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
    sched.set_timesteps(10)
    te.requires_grad_(False)
    m = dreamblend.load_unet(unet.state_dict(), "cpu")
    x0, ids = dreamblend.make_base_batch(4, gen)
    emb = dreamblend.encode(te, ids)
    z_T = dreamblend.ddim_invert(m[0], sched, x0, emb)
    recon, _ = dreamblend.ddim_sample(*m, sched, z_T, emb, emb, 1.0)
    fresh, _ = dreamblend.ddim_sample(*m, sched, torch.randn(z_T.shape, generator=gen), emb, emb,
                                      1.0)
    mse_recon, mse_fresh = F.mse_loss(recon, x0).item(), F.mse_loss(fresh, x0).item()
    # measured: 0.014 vs 0.57 (ratio 0.024); converting v at the wrong noise level gives 0.15
    assert mse_recon < 0.06 * mse_fresh, (mse_recon, mse_fresh)


def test_finetune_feeds_instance_then_class_and_touches_only_unet(models, monkeypatch):
    te, unet, train_sched, _ = models
    cfg = dreamblend.Config(steps=3, checkpoints="0,1", early_step=1, log_every=10, ft_batch=2)
    u = dreamblend.build_unet()
    u.load_state_dict(unet.state_dict())
    te_before = dreamblend.snapshot(te)
    gen = torch.Generator().manual_seed(0)
    inst = dreamblend.make_subject(3, gen)
    cls = torch.full((5, 3, 16, 16), -0.5)
    e = dreamblend.encode(te, dreamblend.tokenize(["a sks square"]))
    c = dreamblend.encode(te, dreamblend.tokenize(["a square"]))
    seen = []
    real_loss = dreamblend.dreambooth_loss

    def spy(pred, target, n_instance, prior_weight):
        seen.append((len(pred), n_instance, prior_weight))
        return real_loss(pred, target, n_instance, prior_weight)

    monkeypatch.setattr(dreamblend, "dreambooth_loss", spy)
    fed = []
    hook = u.register_forward_pre_hook(
        lambda mod, args, kw: fed.append((args[0].clone(), kw["encoder_hidden_states"].clone())),
        with_kwargs=True)
    ckpts, losses = dreamblend.finetune(cfg, u, train_sched, inst, e, cls, c, gen, "cpu")
    hook.remove()
    assert seen == [(4, 2, cfg.prior_weight)] * 3  # 2 instance + 2 class images per step
    for _, emb in fed:  # instance prompt for the first half, class prompt for the second
        assert torch.equal(emb[:2], e.expand(2, -1, -1)) and torch.equal(emb[2:], c.expand(2, -1,
                                                                                             -1))
    assert sorted(ckpts) == [0, 1, 3] and len(losses) == 3
    assert all(torch.equal(te_before[k], v) for k, v in te.state_dict().items())
    key = "conv_in.weight"
    assert not torch.equal(ckpts[0][key], ckpts[3][key])  # the UNet did move
    saved = ckpts[3][key].clone()
    with torch.no_grad():
        u.conv_in.weight.add_(1.0)
    assert torch.equal(ckpts[3][key], saved)


def test_tokenize_pads_right():
    ids = dreamblend.tokenize(["a sks square", ""])
    assert ids.tolist() == [[1, 5, 2, 0, 0], [0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- tier 4: smoke run + CLI
@pytest.mark.slow
def test_quick_run_smoke_cache_and_same_seed(tmp_path):
    out = dreamblend.train(dreamblend.Config(quick=True, world="colour",
                                             out_dir=str(tmp_path / "a")))
    summary = dreamblend.report(out)
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert set(s) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                      "premise", "arms"}
    assert s["folder"] == "dreamblend" and s["config"]["steps"] == dreamblend.QUICK["steps"]
    assert all(set(r) == {"metric", "higher_is_better", "expect", "method", "baseline"}
               for r in s["headline"])
    # the design as data: every checkpoint and variant from the same fine-tuning run; the
    # guided variants use the configured lambda, inversion alone none; DreamBlend is the
    # config's variant
    cfg, arms = out["cfg"], s["arms"]
    assert [arms[f"ckpt {k}"]["steps"] for k in out["ckpts"]] == out["ckpts"]
    assert arms["guidance alone"]["guidance_lr"] == cfg.guidance_lr
    assert arms["inversion + guidance"]["invert"] is True
    assert arms["inversion alone (lambda=0)"]["guidance_lr"] == 0.0
    assert arms["DreamBlend"] == arms["guidance alone"] and not cfg.invert
    names = [r["name"] for r in s["premise"]]
    assert any("early - late" in n for n in names) and any("after / before" in n for n in names)
    assert any("attention collapse" in n for n in names)
    assert any("transplant" in n for n in names)
    # the premise rows come from this run's own rows and maps
    collapse = out["collapse"]
    assert set(collapse) == {f"ckpt {k}" for k in out["ckpts"]}
    e, l_ = f"ckpt {cfg.early_step}", f"ckpt {cfg.steps}"
    want = (collapse[l_][0] / collapse[l_][1]) / (collapse[e][0] / collapse[e][1])
    row = next(r for r in s["premise"] if "attention collapse" in r["name"])
    assert row["value"] == pytest.approx(want)
    # the rival: chosen on validation noises, its record in arms, its value in the headline
    assert "validation" in arms["best checkpoint"]["chosen_on"]
    assert arms["best checkpoint"]["steps"] == out["chosen"] in out["ckpts"]
    assert s["headline"][0]["baseline"]["value"] == pytest.approx(
        s["metrics"][f"both/ckpt {out['chosen']}"])
    assert "both/" + dreamblend.TRANSPLANT in s["metrics"]
    before, after = out["descent"]
    ratio = next(r for r in s["premise"] if "after / before" in r["name"])
    assert ratio["value"] == pytest.approx(after / before) and before > 0
    assert s["headline"][0]["expect"] == "better"
    assert s["headline"][0]["baseline"]["name"] == "best checkpoint"
    assert {"both/DreamBlend", "both/DreamBlend, teal", "prompt_fid/guidance alone",
            "both/inversion alone (lambda=0)", "both/inversion + guidance"} <= set(s["metrics"])
    pre = out["history"]["pretrain_loss"]
    assert all(map(lambda x: x == x and abs(x) < 1e3, pre + out["history"]["finetune_loss"]))
    assert sum(pre[-3:]) < sum(pre[:3])
    assert (tmp_path / "a" / "dreamblend_grid.png").is_file()
    assert (tmp_path / "a" / "dreamblend_tradeoff.png").is_file()
    assert s["metrics"]["pretrain_cached"] == 0.0
    # the same folder again: the cached pre-trained model, and the same numbers
    again = dreamblend.train(dreamblend.Config(quick=True, world="colour",
                                               out_dir=str(tmp_path / "a")))
    assert again["metrics"]["pretrain_cached"] == 1.0
    strip = {k: v for k, v in out["metrics"].items() if k != "pretrain_cached"}
    assert strip == {k: v for k, v in again["metrics"].items() if k != "pretrain_cached"}


@pytest.mark.parametrize("world", ["layout", "colour"])
def test_pretraining_same_seed_same_numbers_other_seed_other(tmp_path, world):
    def losses(seed, sub):
        cfg = dreamblend.Config(pre_steps=2, pre_batch=4, seed=seed, world=world,
                                out_dir=str(tmp_path / sub))
        w = dreamblend.toy_world(cfg, torch.device("cpu"))
        return w.pre_losses, w.inst

    (a, inst_a), (b, inst_b), (c, _) = losses(0, "a"), losses(0, "b"), losses(1, "c")
    assert a == b and torch.equal(inst_a, inst_b) and a != c


@pytest.mark.parametrize("argv, needle", [
    (["--steps", "-3"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--device", "tpu"], "invalid choice"),
    (["--mixed-precision", "fp8"], "invalid choice"),
    (["--checkpoints", "0,999"], "--checkpoints"),
    (["--ft-lr", "0"], "--ft-lr"),
    (["--pretrained", "some/model"], "needs --instance-dir"),
    (["--instance-dir", "photos"], "only applies with --pretrained"),
    (["--pretrained", "x", "--instance-dir", "p", "--pre-steps", "9"], "only applies to the toy"),
])
def test_bad_arguments_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        dreamblend.main(argv)
    err = capsys.readouterr().err.strip() or str(e.value.code)
    assert e.value.code != 0 and len(err.splitlines()) == 1 and needle in err


def test_unwritable_out_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--quick", "--out-dir", str(tmp_path / "file" / "sub")])
    assert "not a writable folder" in str(e.value.code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "no CUDA GPU is available" in err and len(err.splitlines()) == 1


def _photo(path, colour):
    import matplotlib.image
    import numpy as np
    matplotlib.image.imsave(path, np.ones((20, 24, 3)) * np.array(colour) / 255)


def test_real_scale_offline_is_one_line(tmp_path, monkeypatch):
    """--pretrained with a hub name and no network stops with one clear line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _photo(tmp_path / "a.png", (200, 10, 10))
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--pretrained", "no-such-org/no-such-model", "--instance-dir",
                         str(tmp_path), "--out-dir", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert "could not load" in msg and "network" in msg and len(msg.splitlines()) == 1


# ---------------------------------------------------------------- real scale, offline, on CPU
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion folder (eps-prediction UNet with cross-attention, a 2x VAE, a
    CLIP text encoder, a character-level CLIP tokenizer), written with save_pretrained."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    root = tmp_path_factory.mktemp("tiny_sd")
    chars = [chr(c) for c in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=24)
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      max_position_embeddings=24))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                        sample_size=16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    photos = root / "photos"
    photos.mkdir()
    for i, col in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        _photo(photos / f"{i}.png", col)
    return root / "pipe", photos


@pytest.mark.slow
def test_real_scale_path_runs_end_to_end_offline(tiny_sd, tmp_path, monkeypatch):
    """The code a GPU user runs (--pretrained), here on CPU: every flag reaches the run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, photos = tiny_sd
    out = tmp_path / "out"
    argv = ["--pretrained", str(pipe), "--instance-dir", str(photos), "--out-dir", str(out),
            "--resolution", "16", "--steps", "3", "--checkpoints", "1", "--early-step", "1",
            "--n-instance", "2", "--n-class", "2", "--ft-batch", "1", "--sample-steps", "3",
            "--guided-steps", "2", "--guidance-lr", "0.5", "--cfg-scale", "2.0",
            "--eval-seeds", "2", "--eval-batch", "4", "--contexts", "on the beach,in snow",
            "--instance-prompt", "a sks dog", "--class-prompt", "a dog", "--seed", "3",
            "--mixed-precision", "bf16", "--grad-checkpointing", "--invert"]
    res = dreamblend.train(dreamblend.parse_args(argv))
    dreamblend.report(res)
    s = json.loads((out / "summary.json").read_text())
    assert s["seed"] == 3 and s["config"]["pretrained"] == str(pipe)
    assert s["config"]["steps"] == 3 and s["config"]["invert"] is True
    assert len(res["history"]["finetune_loss"]) == 3
    assert len(res["history"]["guidance_loss"]["inversion + guidance"]) == 2  # K = 2 steps
    assert all(x == x for x in res["history"]["finetune_loss"])
    assert set(res["images"]) == {"ckpt 0", "ckpt 1", "ckpt 3", "inversion alone (lambda=0)",
                                  "guidance alone", "inversion + guidance"}
    assert all(v.shape == (4, 3, 16, 16) for v in res["images"].values())  # 2 contexts x 2
    assert s["headline"][0]["expect"] == "report" and "diversity/DreamBlend" in s["metrics"]
    assert "diversity/DreamBlend, in snow" in s["metrics"]
    assert (out / "dreamblend_grid.png").is_file()


def test_guidance_step_is_a_normalised_step_down_the_gradient(models):
    """(D2) [R]: the step is -s * grad / rms(grad) per sample, with s = lambda halved k >= 0
    times (at most GUIDE_HALVINGS), or no step; it never raises the loss."""
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 3)
    t = sched.timesteps[1]
    _, ref_maps = dreamblend.ddim_sample(*early, sched, z_T, emb, null, 3.0, record=True)
    x = z_T.clone().requires_grad_(True)
    late[1].clear()
    dreamblend.model_out(late[0], x, t, emb)
    loss = dreamblend.attention_loss(late[1].maps, ref_maps[1], len(x))
    (grad,) = torch.autograd.grad(loss.sum(), x)
    late[1].clear()
    unit = grad / grad.flatten(1).pow(2).mean(1).sqrt().view(-1, 1, 1, 1)  # RMS 1 per sample
    lam = 0.3
    z1, loss0 = dreamblend.guidance_step(*late, z_T, t, emb, ref_maps[1], lam=lam)
    _, loss1 = dreamblend.guidance_step(*late, z1, t, emb, ref_maps[1], lam=0.0)
    torch.testing.assert_close(loss0, loss.detach())
    allowed = [lam / 2 ** k for k in range(dreamblend.GUIDE_HALVINGS + 1)]
    for b in range(len(z_T)):
        step = z_T[b] - z1[b]
        size = float(step.pow(2).mean().sqrt())
        assert min(abs(size - a) for a in allowed) < 1e-5  # lambda / 2^k, never more
        torch.testing.assert_close(step, size * unit[b], atol=1e-5, rtol=1e-4)
    assert (loss1 < loss0).all()
    z0, _ = dreamblend.guidance_step(*late, z_T, t, emb, ref_maps[1], lam=0.0)
    assert torch.equal(z0, z_T)


class _DenseMaps(torch.nn.Module):
    """A stand-in UNet whose one cross-attention map (B, 64 queries, 5 tokens) is a softmax of a
    dense linear function of the whole latent, of steepness k: like a trained UNet, every latent
    pixel moves every map entry, so the raw gradient grows with k."""

    def __init__(self, store, k):
        super().__init__()
        self.store, self.k = store, k
        self.W = torch.randn(3 * 16 * 16, 64 * 5,
                             generator=torch.Generator().manual_seed(1)) / 768 ** 0.5

    def forward(self, z, t, encoder_hidden_states):
        logits = self.k * z.flatten(1) @ self.W  # (B, 320)
        self.store.maps["l"] = logits.view(len(z), 64, 5).softmax(-1)  # (B, 64, 5)
        return _Out(torch.zeros_like(z))


@pytest.mark.parametrize("lam", [dreamblend.Config().guidance_lr,
                                 dreamblend.LAYOUT_DEFAULTS["guidance_lr"]])
@pytest.mark.parametrize("k", [3.0, 30.0])
def test_default_lambda_step_lowers_its_own_loss(k, lam):
    """Issue 35: at the DEFAULT lambda one guidance step must lower the attention loss it
    follows, on a shallow (k = 3) and a steep (k = 30) map alike. The raw pix2pix-zero step
    z - lambda * grad overshoots on the steep map (its size grows with the gradient), which is
    what the old default did on the trained toy (6.4 -> 10.7 at t = 950). Both worlds' defaults
    (the colour world's Config value, the layout world's LAYOUT_DEFAULTS)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 16, 16, generator=g)
    z_ref = z + 0.1 * torch.randn(4, 3, 16, 16, generator=g)
    store = dreamblend.AttnStore()
    fake = _DenseMaps(store, k)
    fake(z_ref, 0, None)
    ref = {"l": store.maps["l"].detach()}

    def loss_at(zz):
        fake(zz, 0, None)
        return dreamblend.attention_loss(store.maps, ref, len(zz))

    z1, before = dreamblend.guidance_step(fake, store, z, 0, None, ref, lam)
    with torch.no_grad():
        after = loss_at(z1)
    torch.testing.assert_close(before, loss_at(z).detach())
    assert (after < before).all(), (before, after)
    if k == 30.0 and lam == dreamblend.Config().guidance_lr:  # the premise of the fix: the raw
        # step at the colour default overshoots here
        x = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_at(x).sum(), x)
        with torch.no_grad():
            assert (loss_at(z - lam * grad) > before).any()


def test_transplant_uses_the_recorded_maps_in_the_conditional_branch(models):
    """Premise upper bound: the late model's conditional cross-attention reads the injected
    maps (its own values), the unconditional branch its own maps; a model fed its own maps
    samples exactly as without the transplant."""
    te, unet, _, sched = models
    emb, null, z_T = _inputs(te)
    early, late = _pair(unet, 6)
    plain, own = dreamblend.ddim_sample(*late, sched, z_T, emb, null, 3.0, record=True)
    same = dreamblend.transplant_sample(*late, sched, z_T, emb, null, 3.0, own)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    _, ref = dreamblend.ddim_sample(*early, sched, z_T, emb, null, 3.0, record=True)
    moved = dreamblend.transplant_sample(*late, sched, z_T, emb, null, 3.0, ref)
    assert (moved - plain).abs().max() > 1e-4
    assert late[1].inject is None  # switched off again
    # inside a step: the conditional pass returns the injected maps, the null pass its own
    late[1].inject = ref[0]
    late[1].clear()
    dreamblend.model_out(late[0], z_T, sched.timesteps[0], emb)
    k = next(iter(ref[0]))
    assert torch.equal(late[1].maps[k], ref[0][k])
    late[1].inject = None
    late[1].clear()
    dreamblend.model_out(late[0], z_T, sched.timesteps[0], emb)
    assert not torch.allclose(late[1].maps[k], ref[0][k])


def test_collapse_stats_by_hand():
    """The background word's mean attention on the central 4x4 queries and on the outer ring,
    over the first COLLAPSE_STEPS steps only."""
    m = torch.zeros(2, 64, 5)  # (B*heads, 8x8 queries, 5 tokens)
    grid = m[:, :, dreamblend.BG_TOKEN].view(2, 8, 8)
    grid[:, 2:6, 2:6] = 0.6  # the centre
    grid[:, 0, :], grid[:, 7, :], grid[:, :, 0], grid[:, :, 7] = 0.1, 0.1, 0.1, 0.1  # the ring
    m[:, :, dreamblend.BG_TOKEN] = grid.reshape(2, 64)
    late_step = {"l": torch.ones(2, 64, 5)}  # after COLLAPSE_STEPS: must be ignored
    maps = [{"l": m, "l2": m}] * dreamblend.COLLAPSE_STEPS + [late_step]
    c, r = dreamblend.collapse_stats(maps)
    assert c == pytest.approx(0.6) and r == pytest.approx(0.1)


def test_rival_is_chosen_on_validation_noises_not_on_the_evaluation_images(monkeypatch):
    """validation_choice samples every checkpoint from noises of its own generator (seed + 4)
    and picks the best per-image rate there; ties go to the higher (bg + subject) / 2."""
    seen = []

    def fake_sample(unet, store, sched, z, emb, null, w, record=False):
        seen.append(z.clone())
        return torch.full_like(z, float(unet)), None  # the image encodes the checkpoint

    rates = {0: (0.0, 0.0, 0.0), 20: (0.5, 0.5, 0.5), 50: (0.5, 1.0, 1.0), 400: (0.1, 0.0, 1.0)}

    def score(imgs, idx):  # both, bg, subject per checkpoint, the same for every image
        both, bg, subj = rates[int(imgs[0, 0, 0, 0])]
        n = len(imgs)
        return {"both": torch.full((n,), both), "bg": torch.full((n,), bg),
                "subject_rate": torch.full((n,), subj)}

    monkeypatch.setattr(dreamblend, "ddim_sample", fake_sample)
    world = dreamblend.World(unet=None, train_sched=None, sample_sched=None,
                             embed=lambda p: torch.zeros(len(p), 5, 8),
                             inst=torch.zeros(1, 3, 16, 16), inst_prompt="", class_prompt="",
                             eval_prompts=["a", "b"], labels=["a", "b"], decode=lambda z: z,
                             score=score)
    cfg = dreamblend.Config(seed=7, val_seeds=3)
    models = {s: (s, None) for s in rates}
    chosen, val = dreamblend.validation_choice(cfg, world, models, "cpu")
    assert chosen == 50 and val == pytest.approx({0: 0.0, 20: 0.5, 50: 0.5, 400: 0.1})
    want = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7 + 4))
    assert all(torch.equal(z, want.repeat(2, 1, 1, 1)) for z in seen)
    evaluation = torch.randn((3, 3, 16, 16), generator=torch.Generator().manual_seed(7 + 2))
    assert not torch.equal(want, evaluation)


def test_headline_rival_is_the_validation_choice_and_the_oracle_a_report():
    base = {"bg": 0.5, "prompt_fid": 0.5, "subject_fid": 0.5, "subject_rate": 0.5,
            "diversity": 1.0}
    rows = {f"ckpt {s}": {**base, "both": b} for s, b in ((0, 0.0), (20, 0.1), (400, 0.4))}
    for n in ("guidance alone", "inversion + guidance", "inversion alone (lambda=0)",
              dreamblend.TRANSPLANT):
        rows[n] = {**base, "both": 0.2}
    head = dreamblend.make_headline(dreamblend.Config(), rows, "guidance alone", "ckpt 20",
                                    "ckpt 400", [0, 20, 400], chosen=20)
    assert head[0]["expect"] == "better" and head[0]["baseline"]["name"] == "best checkpoint"
    assert head[0]["baseline"]["value"] == pytest.approx(0.1)  # validation's pick, not 0.4
    oracle = next(r for r in head if "oracle" in r["baseline"]["name"])
    assert oracle["expect"] == "report" and oracle["baseline"]["value"] == pytest.approx(0.4)
    upper = next(r for r in head if "upper bound" in r["baseline"]["name"])
    assert upper["expect"] == "report"


def test_object_present_reads_exactly_the_central_10x10_and_needs_25_pixels():
    """The object test counts pixels in rows/columns 3..12 only, and 25 of them are enough."""
    ring = [(3, c) for c in range(3, 13)] + [(r, 3) for r in range(4, 12)] + \
        [(12, c) for c in range(3, 10)]  # 25 pixels on the edge of the central crop
    assert len(ring) == dreamblend.OBJECT_MIN == 25

    def image(pixels):
        img = torch.zeros(1, 3, 16, 16)  # background 0, border colour 0
        for r, c in pixels:
            img[0, :, r, c] = 1.0  # RGB distance sqrt(3) > OBJECT_DIST
        return img

    assert dreamblend.object_present(image(ring)).tolist() == [True]  # exactly 25 inside
    assert dreamblend.object_present(image(ring[:24])).tolist() == [False]
    assert dreamblend.object_present(image(ring[:24] + [(6, 13)])).tolist() == [False]
    assert dreamblend.object_present(image(ring[:24] + [(13, 6)])).tolist() == [False]


# ---------------------------------------------------------------- the layout world
def _at(place, checker=True, shape="square", size=8, dx=0, dy=0):
    cx, cy = dreamblend.PLACES[place]
    return dreamblend.render(shape, None if checker else dreamblend.OBJ_COLOURS["red"],
                             dreamblend.BG_COLOURS["gray"], size, cx + dx, cy + dy,
                             checker=checker)


def test_layout_scores_by_hand():
    """Success = the object's centroid nearest the named place AND the subject present: a
    centred subject asked at left fails, a plain square at left has the place but no subject,
    a blank image has nothing, a subject shifted by 1 px still counts."""
    imgs = torch.stack([_at("left"), _at("centre"), _at("left", checker=False, size=6),
                        torch.zeros(3, 16, 16), _at("top", dx=-1, dy=1), _at("right"),
                        _at("bottom")])
    s = dreamblend.layout_scores(imgs, ["left", "left", "left", "left", "top", "right", "top"])
    assert s["bg"].tolist() == [1, 0, 1, 0, 1, 1, 0]
    assert s["object"].tolist() == [1, 1, 1, 0, 1, 1, 1]
    assert s["subject_rate"].tolist() == [1, 1, 0, 0, 1, 1, 1]
    assert s["both"].tolist() == [1, 0, 0, 0, 1, 1, 0]
    assert torch.equal(s["prompt_fid"], s["bg"])
    # the subject's checker correlation is high wherever it is, a plain shape's low anywhere
    corr = dreamblend.checker_corr_anywhere(imgs)
    assert (corr[[0, 1, 4, 5, 6]] > 0.9).all() and corr[2] < 0.3 and corr[3] == 0


def test_object_place_needs_16_pixels_and_reads_the_centroid():
    img = torch.zeros(1, 3, 16, 16)
    img[0, :, 6:10, 0:4] = 1.0  # 16 pixels, centroid (2, 8): nearest "left"
    where, obj = dreamblend.object_place(img)
    assert obj.tolist() == [True] and list(dreamblend.PLACES)[int(where)] == "left"
    img[0, :, 9, 0:4] = 0.0  # 12 pixels: too few
    assert dreamblend.object_place(img)[1].tolist() == [False]
    img = torch.zeros(1, 3, 16, 16)
    img[0, :, 0:4, 6:10] = 1.0  # top
    img[0, :, 6:10, 6:10] = 1.0  # and the centre: the centroid (8, 5) is nearest "top"
    assert list(dreamblend.PLACES)[int(dreamblend.object_place(img)[0])] == "top"


def test_place_collapse_stats_by_hand():
    """The place word's attention on each sample's own named 4x4 block against the other 48
    queries, heads laid out sample-major, first COLLAPSE_STEPS steps only."""
    places, heads = ["left", "top"], 2
    masks = dreamblend.place_masks(places)  # (2, 64)
    assert masks.sum(1).tolist() == [16, 16]
    assert masks.view(2, 8, 8)[0, 2:6, 0:4].all() and masks.view(2, 8, 8)[1, 0:4, 2:6].all()
    m = torch.zeros(len(places) * heads, 64, 5)  # (B*heads, 8x8 queries, 5 tokens)
    for b in range(len(places)):
        for h in range(heads):
            a = torch.full((64,), 0.1)
            a[masks[b]] = 0.5 + 0.1 * b  # sample 0: 0.5 at its place, sample 1: 0.6
            m[b * heads + h, :, dreamblend.PLACE_TOKEN] = a
    late_step = {"l": torch.ones(4, 64, 5)}  # after COLLAPSE_STEPS: ignored
    maps = [{"l": m}] * dreamblend.COLLAPSE_STEPS + [late_step]
    c, r = dreamblend.place_collapse_stats(maps, masks)
    assert c == pytest.approx(0.55) and r == pytest.approx(0.1)


def texture_of(img):
    """Which 2-px pattern an image's shape carries, read back from its pixels: plain, striped
    (dark rows), barred (dark columns) or checked (neither rows nor columns uniform)."""
    m = (img != 0).any(0)  # (H, W) the shape
    dark = (img[0] == dreamblend.LAYOUT_DARK) & m
    if not dark.any():
        return "plain"
    rows = {int(y) for y in dark.nonzero()[:, 0]}
    cols = {int(x) for x in dark.nonzero()[:, 1]}
    if all(dark[y][m[y]].all() for y in rows):
        return "striped"
    if all(dark[:, x][m[:, x]].all() for x in cols):
        return "barred"
    return "checked"


def test_layout_batch_prompts_name_where_the_object_is():
    """Pre-training data of the layout world: a white shape with one of the textures on gray,
    prompt "a {texture} {shape} at {place}" with no colour word; the named place is where the
    object is, the named shape its shape, the named texture its texture, and the texture and
    place words are each dropped only sometimes."""
    imgs, ids = dreamblend.make_layout_batch(96, torch.Generator().manual_seed(0))
    inv = {i: w for w, i in dreamblend.LAYOUT_TOK.items()}
    where, obj = dreamblend.object_place(imgs)
    named, textured, seen = 0, 0, set()
    for img, row, w in zip(imgs, ids.tolist(), where.tolist()):
        words = [inv[i] for i in row if i]
        tex = texture_of(img)
        seen.add(tex)
        if words[1] in dreamblend.TEXTURES:
            textured += 1
            assert words[1] == tex
            words = words[:1] + words[2:]
        assert words[:2] in (["a", "square"], ["a", "circle"]) and len(words) in (2, 4)
        if "at" in words:
            named += 1
            assert words[2:] == ["at", list(dreamblend.PLACES)[w]]
        assert (img[:, 0, 0] == torch.tensor(dreamblend.BG_COLOURS["gray"])).all()
        colours = {tuple(c) for c in img.flatten(1).T.tolist()}
        d = float(torch.tensor(dreamblend.LAYOUT_DARK))  # as float32 stores it
        assert colours <= {(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (d, d, d)}
        # the shape word: a square fills its bounding box, a circle does not
        m = (img != 0).any(0)
        ys, xs = m.nonzero(as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert (int(m.sum()) == int(box)) == (words[1] == "square")
    assert obj.all() and 45 < named < 90 and 45 < textured < 90
    assert seen == set(dreamblend.TEXTURES)  # the subject's checks are never in pre-training


def test_layout_subject_is_a_texture_the_base_model_never_drew():
    """The layout world's subject: a centred square of 2-px checks, white and LAYOUT_DARK, found
    by the subject metric; the pre-training textures at every place are not (checker correlation
    below SUBJECT_TAU), so "subject present" means the fine-tuned appearance."""
    inst = dreamblend.make_layout_subject(4, torch.Generator().manual_seed(1))
    where, obj = dreamblend.object_place(inst)
    assert obj.all() and (where == list(dreamblend.PLACES).index("centre")).all()
    assert all(texture_of(x) == "checked" for x in inst)
    assert (dreamblend.checker_corr_anywhere(inst) > 0.99).all()
    others = torch.stack([dreamblend.render_textured(sh, tex, size, *xy)
                          for sh in ("square", "circle") for tex in dreamblend.TEXTURES
                          for size in (6, 8) for xy in dreamblend.PLACES.values()])
    assert dreamblend.checker_corr_anywhere(others).max() < dreamblend.SUBJECT_TAU
    # the checks moved to another place are still the subject (the metric looks anywhere)
    moved = dreamblend.render_textured("square", "checked", 8, *dreamblend.PLACES["left"])
    assert dreamblend.checker_corr_anywhere(moved[None])[0] > 0.99


@pytest.mark.parametrize("world", ["layout", "colour"])
def test_pretrain_freezes_the_text_encoder_and_tilts_t_in_the_layout_world_only(tmp_path, world):
    """Layout world: the text encoder keeps its initial weights, the UNet sees each word's own
    layer-normed embedding (word_states), and the first half of each batch draws t from
    [LAYOUT_HIGH_T, 1000); colour world: both trained, CLIP states, t uniform."""
    cfg = dreamblend.Config(world=world, pre_steps=3, pre_batch=8, out_dir=str(tmp_path))
    layout = world == "layout"
    te, unet, sched, _ = dreamblend.build_models(
        vocab_size=len(dreamblend.LAYOUT_VOCAB if layout else dreamblend.VOCAB), coords=layout)
    te0, unet0 = dreamblend.snapshot(te), dreamblend.snapshot(unet)
    seen, states, forward = [], [], unet.forward
    unet.forward = lambda z, t, **kw: (seen.append(t.clone()), states.append(
        kw["encoder_hidden_states"].detach()), forward(z, t, **kw))[2]
    dreamblend.pretrain(cfg, te, unet, sched, torch.Generator().manual_seed(0), "cpu")
    # layout: each text state is one word's own layer-normed embedding (no position, no mixing)
    words = dreamblend.word_states(te, torch.arange(len(dreamblend.LAYOUT_VOCAB if layout
                                                         else dreamblend.VOCAB))[None])[0]
    dist = torch.cdist(torch.cat(states).flatten(0, 1), words).min(1).values  # (steps*B*N,)
    assert (dist.max() < 1e-2) == layout  # (cdist rounds at about 1e-3)
    te_moved = any(not torch.equal(v, te0[k]) for k, v in te.state_dict().items())
    unet_moved = any(not torch.equal(v, unet0[k]) for k, v in unet.state_dict().items())
    assert unet_moved and te_moved != layout
    t = torch.stack(seen)  # (steps, batch)
    high = t >= dreamblend.LAYOUT_HIGH_T
    assert high[:, :4].all() == layout
    assert not high[:, 4:].all()


def test_layout_premise_rows_are_the_written_acceptance_check():
    rows = {"ckpt 20": {"bg": 0.75, "subject_rate": 0.0, "both": 0.0},
            "ckpt 400": {"bg": 0.25, "subject_rate": 0.9, "both": 0.1},
            dreamblend.TRANSPLANT: {"bg": 0.5, "subject_rate": 0.8, "both": 0.3}}
    collapse = {"ckpt 20": (0.4, 0.1), "ckpt 400": (0.2, 0.1)}
    out = dreamblend.dreamblend_premise(rows, "ckpt 20", "ckpt 400", ["ckpt 20", "ckpt 400"],
                                        (2.0, 1.0), collapse, "ckpt 400", world="layout")
    by = {r["name"]: r for r in out}
    early = by["early checkpoint: object at the named place"]
    late = by["late checkpoint: object at the named place"]
    carry = next(r for n, r in by.items() if n.startswith("maps carry the place"))
    assert (early["cmp"], early["threshold"], early["holds"]) == (">=", 0.7, True)
    assert (late["cmp"], late["threshold"], late["holds"]) == ("<=", 0.3, True)
    assert carry["value"] == pytest.approx(0.25) and carry["threshold"] == 0.3
    assert carry["holds"] is False
    ratio = next(r for n, r in by.items() if n.startswith("attention collapse"))
    assert ratio["value"] == pytest.approx(0.5) and ratio["holds"] is None
    assert not any("right-background" in n or "centre / ring" in n for n in by)
    colour = dreamblend.dreamblend_premise(rows, "ckpt 20", "ckpt 400", ["ckpt 20", "ckpt 400"],
                                           (2.0, 1.0), collapse, "ckpt 400")
    assert not any("named place" in r["name"] for r in colour)


@pytest.mark.slow
def test_quick_layout_run_wires_the_layout_world(tmp_path):
    """--world layout: place prompts and scores, the place word's collapse statistic, the
    acceptance rows in the premise, its own vocabulary and cache key."""
    out = dreamblend.train(dreamblend.Config(quick=True, world="layout",
                                             out_dir=str(tmp_path / "l")))
    s = dreamblend.report(out)
    assert out["world"].eval_prompts == [f"a sks square at {p}" for p in dreamblend.EVAL_PLACES]
    # its subject photos are the layout world's (checks in white and LAYOUT_DARK), from the
    # subject stream seed + 1
    cfg0 = out["cfg"]
    torch.testing.assert_close(out["world"].inst, dreamblend.make_layout_subject(
        cfg0.n_instance, torch.Generator().manual_seed(cfg0.seed + 1)))
    # the place word's text state is the same wherever it stands and whatever precedes it
    e1, e2 = out["world"].embed(["a square at left"]), out["world"].embed(["a sks square at left"])
    torch.testing.assert_close(e1[0, 3], e2[0, 4])
    assert out["world"].context == "at the named place"
    assert s["headline"][0]["metric"].startswith("at the named place and subject")
    names = [r["name"] for r in s["premise"]]
    assert names[:2] == ["early checkpoint: object at the named place",
                         "late checkpoint: object at the named place"]
    cfg = out["cfg"]
    e, l_ = f"ckpt {cfg.early_step}", f"ckpt {cfg.steps}"
    carry = next(r for r in s["premise"] if r["name"].startswith("maps carry the place"))
    assert carry["value"] == pytest.approx(s["metrics"]["bg/" + dreamblend.TRANSPLANT]
                                           - s["metrics"][f"bg/{l_}"])
    assert s["premise"][0]["value"] == pytest.approx(s["metrics"][f"bg/{e}"])
    # the run's images scored by the layout metric
    idx, img = out["idx"], out["images"][l_]
    want = dreamblend.layout_scores(img, [dreamblend.EVAL_PLACES[i] for i in idx])
    assert s["metrics"][f"both/{l_}"] == pytest.approx(float(want["both"].mean()))
    # the world's collapse statistic is the place word's, on each image's own named place
    m = torch.rand(len(idx[:4]) * 2, 64, 5)  # (B*heads, 64, N), two heads
    maps = [{"l": m}] * dreamblend.COLLAPSE_STEPS
    places = [dreamblend.EVAL_PLACES[i] for i in idx[:4]]
    assert out["world"].collapse(maps, idx[:4]) == pytest.approx(
        dreamblend.place_collapse_stats(maps, dreamblend.place_masks(places)))
    blob = torch.load(tmp_path / "l" / "pretrained_toy.pt")
    assert blob["key"]["world"] == "layout"
    assert blob["key"]["unet"] == "CoordUNet" == type(out["world"].unet).__name__
    emb = next(v for k, v in blob["text_encoder"].items() if k.endswith("token_embedding.weight"))
    assert emb.shape[0] == len(dreamblend.LAYOUT_VOCAB)


def test_coord_unet_sees_its_pixel_coordinates_and_its_query_positions():
    """The layout world's UNet = a plain UNet with 5 input channels fed (z, x, y), x and y the
    pixel coordinates in [-1, 1], whose every cross-attention (attn2) gets the 2-D sin/cos code
    of its query grid added to its input; checkpoints reload as the same class."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    _, unet, _, _ = dreamblend.build_models(vocab_size=len(dreamblend.LAYOUT_VOCAB), coords=True)
    plain = UNet2DConditionModel.from_config({**unet.config, "_class_name": "UNet2DConditionModel"})
    plain.load_state_dict(unet.state_dict())
    z, emb = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 32)
    t = torch.tensor([500, 500])
    xs = torch.linspace(-1, 1, 16)
    coords = torch.stack([xs.view(1, 16).expand(16, 16), xs.view(16, 1).expand(16, 16)])
    inp = torch.cat([z, coords[None].expand(2, -1, -1, -1)], 1)
    with torch.no_grad():
        no_pos = plain(inp, t, encoder_hidden_states=emb).sample
        attn2 = [m for n, m in plain.named_modules() if n.endswith("attn2")]
        assert len(attn2) == 4
        seen = []

        def add_code(mod, args, kwargs):  # the position code, written out by hand
            h = args[0]  # (B, 64, C): the 8x8 query grid
            code = torch.zeros(64, h.shape[2])
            for q in range(64):
                y, x = divmod(q, 8)
                for axis, v in ((0, x), (1, y)):
                    pos = (-1 + 2 * v / 7) * torch.pi / 2
                    d = h.shape[2] // 2
                    f = 2.0 ** (3 * torch.arange(d // 2) / (d // 2))
                    code[q, axis * d:(axis + 1) * d] = torch.cat([torch.sin(pos * f),
                                                                  torch.cos(pos * f)])
            seen.append(h.shape)
            return (h + code[None],) + tuple(args[1:]), kwargs
        for m in attn2:
            m.register_forward_pre_hook(add_code, with_kwargs=True)
        want = plain(inp, t, encoder_hidden_states=emb).sample
        assert len(seen) == 4 and (want - no_pos).abs().max() > 1e-3  # the code matters
        torch.testing.assert_close(unet(z, t, encoder_hidden_states=emb).sample, want)
        again, _ = dreamblend.load_unet(dreamblend.snapshot(unet), "cpu", unet.config,
                                        cls=type(unet))
        torch.testing.assert_close(again(z, t, encoder_hidden_states=emb).sample, want)
    assert type(again) is type(unet) and unet.config.in_channels == 5


def test_compute_plot_reads_every_seed_and_refuses_an_empty_folder(tmp_path):
    """plot_compute.py: one point per checkpoint (mean over the seeds' summaries), the variants
    at the late checkpoint's steps; an empty folder is a one-line error."""
    from dreamblend import plot_compute
    names = ["ckpt 0", "ckpt 400", "guidance alone", "inversion alone (lambda=0)",
             "inversion + guidance", dreamblend.TRANSPLANT]
    for seed in (0, 1):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        metrics = {f"{k}/{n}": 0.1 * seed + 0.01 * i for i, n in enumerate(names)
                   for k in ("both", "prompt_fid", "subject_fid")}
        (d / "summary.json").write_text(json.dumps(
            {"seed": seed, "config": {"steps": 400, "world": "layout"}, "metrics": metrics}))
    seen = {}
    import matplotlib.axes
    orig = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        seen.setdefault(kw.get("label"), []).append((x, y))
        return orig(self, x, y, yerr, **kw)

    matplotlib.axes.Axes.errorbar = spy
    try:
        plot_compute.main(["--runs", str(tmp_path), "--out", str(tmp_path / "c.png")])
    finally:
        matplotlib.axes.Axes.errorbar = orig
    assert (tmp_path / "c.png").is_file()
    xs, ys = seen["single checkpoint (fine-tuning steps)"][0]
    assert list(xs) == [0, 400] and ys == pytest.approx([0.05, 0.06])  # mean of seeds 0, 1
    x, y = seen["guidance alone (DreamBlend)"][0]
    assert x == 400 and y == pytest.approx(0.07)
    with pytest.raises(SystemExit, match="no seed"):
        plot_compute.main(["--runs", str(tmp_path / "none")])


def test_layout_world_brings_its_tuned_defaults_and_keeps_given_flags():
    """--world layout fills LAYOUT_DEFAULTS (chosen on the tuning seeds) into the fields left at
    their default; a flag given on the command line is kept, checkpoints past --steps are
    dropped, and the colour world and --quick are untouched. --world's help names the same
    values, so the documentation cannot drift from the code."""
    wd, parse = dreamblend.world_defaults, dreamblend.parse_args
    cfg = wd(parse(["--world", "layout"]))
    assert {k: getattr(cfg, k) for k in dreamblend.LAYOUT_DEFAULTS} == dreamblend.LAYOUT_DEFAULTS
    cfg = wd(parse(["--world", "layout", "--steps", "300", "--guidance-lr", "0.2"]))
    assert (cfg.steps, cfg.guidance_lr, cfg.early_step) == (300, 0.2, 50)
    assert cfg.checkpoints == "0,50,100,200"
    colour = parse(["--world", "colour"])
    assert wd(colour) == colour and wd(parse(["--quick"])).steps == 400
    assert parse([]).world == "layout"  # the default world (its check passed; README)
    helptext = next(f for f in dataclasses.fields(dreamblend.Config)
                    if f.name == "world").metadata["help"]
    for k, v in dreamblend.LAYOUT_DEFAULTS.items():
        assert f"--{k.replace('_', '-')} {v}" in helptext


def test_train_and_main_apply_the_layout_defaults(monkeypatch, tmp_path):
    """Call sites: train() (used by notebooks and tests) and main() (the command line) both run
    the layout world with its tuned defaults; a too short --steps is still one line, exit 2."""
    seen = []

    class Stop(Exception):
        pass

    def stop(cfg, device):
        seen.append(cfg)
        raise Stop
    monkeypatch.setattr(dreamblend, "toy_world", stop)
    with pytest.raises(Stop):
        dreamblend.train(dreamblend.Config(world="layout", out_dir=str(tmp_path)))
    with pytest.raises(Stop):
        dreamblend.main(["--world", "layout", "--out-dir", str(tmp_path)])
    assert [c.steps for c in seen] == [1600, 1600]
    assert [c.guidance_lr for c in seen] == [0.02, 0.02]
    with pytest.raises(SystemExit) as e:
        dreamblend.main(["--world", "layout", "--steps", "10", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
