"""Tests for vidla/train.py: masks, Eq. (1) reshape, Eq. (3) loss, retrieval metrics, the
zero-init identity, information flow under the mask, gradients, and a smoke run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vidla import train as vidla

pytestmark = pytest.mark.vidla

NEG = float("-inf")


def tiny_cfg(**kw):
    base = dict(width=16, layers=2, heads=2, frames=4, U=2, V=1, r=2)
    base.update(kw)
    return vidla.Config(**base)


def allowed(mask):
    """0/1 int matrix of the entries that may attend."""
    return (mask == 0).int()


# ---------------------------------------------------------------- masks
@pytest.mark.exercise
def test_global_mask_tiny_config_entry_by_entry():
    # 2 frames, 2 patches per frame, U = 2 levels, V = 1 token per level, r = 2.
    # Order: CLS | MST0 MST1 | f0n0 f0n1 f1n0 f1n1.
    M = vidla.vidla_global_mask(T=2, N=2, U=2, V=1, r=2)
    expected = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1],  # CLS sees everything
        [0, 1, 0, 1, 1, 1, 1],  # MST level 0: own level only, every frame
        [0, 1, 1, 1, 1, 0, 0],  # MST level 1: levels 0 and 1, frame 0 only (stride 2)
        [0, 1, 1, 1, 1, 0, 0],  # patches of frame 0: all MST + own frame, never CLS
        [0, 1, 1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0, 1, 1],  # patches of frame 1
        [0, 1, 1, 0, 0, 1, 1],
    ])
    assert M.shape == (7, 7)
    assert torch.equal(allowed(M), expected)
    # additive mask: exactly 0 or -inf
    assert bool(((M == 0) | (M == NEG)).all())


@pytest.mark.exercise
def test_global_mask_figure3_config_rules():
    # The notes' Figure 3 toy: T = 4, N = 4, U = 2, V = 1, r = 2 -> 19 x 19.
    T, N, U, V, r = 4, 4, 2, 1, 2
    A = allowed(vidla.vidla_global_mask(T, N, U, V, r))
    K = U * V
    assert A.shape == (19, 19)
    assert A[0].sum() == 19  # CLS row all allowed
    assert A[1:, 0].sum() == 0  # nobody else sees CLS
    for i in range(T * N):  # patch rows: all MST + own frame
        row = A[1 + K + i]
        f = i // N
        want = torch.zeros(19, dtype=torch.int)
        want[1:1 + K] = 1
        want[1 + K + f * N:1 + K + (f + 1) * N] = 1
        assert torch.equal(row, want)
        assert row.sum() == K + N
    # MST level 0: MST-0 (not MST-1) + all patches
    assert A[1].tolist() == [0, 1, 0] + [1] * 16
    # MST level 1: MST-0 and MST-1 + patches of frames {0, 2}
    assert A[2].tolist() == [0, 1, 1] + [1] * 4 + [0] * 4 + [1] * 4 + [0] * 4


def test_global_mask_default_strides_and_levels():
    # U = 3, V = 2, r = 2 over T = 8 frames: level 2 sees frames {0, 4}; level u sees levels <= u.
    T, N, U, V, r = 8, 4, 3, 2, 2
    A = allowed(vidla.vidla_global_mask(T, N, U, V, r))
    K = U * V
    for i in range(K):
        u = i // V
        frames_seen = sorted({j // N for j in range(T * N) if A[1 + i, 1 + K + j]})
        assert frames_seen == list(range(0, T, r ** u))
        levels_seen = sorted({j // V for j in range(K) if A[1 + i, 1 + j]})
        assert levels_seen == list(range(u + 1))
    assert bool((A.sum(1) >= 1).all())  # every row attends somewhere (no NaN softmax)


def test_local_mask_rows_have_T_zeros_at_same_position():
    T, N = 3, 4
    M = vidla.local_temporal_mask(T, N)
    A = allowed(M)
    assert torch.equal(A.sum(1), torch.full((T * N,), T))
    for i in range(T * N):
        for j in range(T * N):
            assert A[i, j] == int(i % N == j % N)


# ---------------------------------------------------------------- Eq. (1)
def _random_mha(d, heads, seed=0):
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(d, heads, batch_first=True)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    return attn


@pytest.mark.exercise
def test_local_temporal_reshape_equals_masked_attention():
    B, T, N, d = 2, 3, 4, 8
    attn, ln = _random_mha(d, 2), nn.LayerNorm(d)
    z = torch.randn(B, T * N, d)
    fast = vidla.local_temporal_attention(z, ln, attn, T, N)
    h = ln(z)
    slow = z + attn(h, h, h, attn_mask=vidla.local_temporal_mask(T, N), need_weights=False)[0]
    assert fast.shape == (B, T * N, d)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_local_temporal_mixes_only_same_position():
    B, T, N, d = 1, 3, 4, 8
    attn, ln = _random_mha(d, 2), nn.LayerNorm(d)
    z = torch.randn(B, T * N, d)
    z2 = z.clone()
    z2[0, 1 * N + 2] += torch.randn(d)  # frame 1, position 2 (not a constant: LN removes it)
    diff = (vidla.local_temporal_attention(z2, ln, attn, T, N)
            - vidla.local_temporal_attention(z, ln, attn, T, N)).abs().sum(-1)[0]
    changed = {int(j) for j in torch.nonzero(diff > 1e-6)}
    assert changed == {2, N + 2, 2 * N + 2}


# ---------------------------------------------------------------- the VidLA tower
@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    return vidla.VidLA(vidla.make_clip(cfg), cfg), cfg


def test_sequence_and_embedding_shapes(tower):
    model, cfg = tower
    video = torch.randn(3, cfg.frames, 3, vidla.IMG, vidla.IMG)
    N = (vidla.IMG // vidla.PATCH) ** 2
    assert model.embed(video).shape == (3, 1 + cfg.U * cfg.V + cfg.frames * N, cfg.width)
    assert model.global_mask.shape[-1] == 1 + cfg.U * cfg.V + cfg.frames * N
    v = model.encode_video(video)
    assert v.shape == (3, cfg.width)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))


def test_patch_order_is_frame_major(tower):
    model, cfg = tower
    N = model.N
    video = torch.zeros(1, cfg.frames, 3, vidla.IMG, vidla.IMG)
    base = model.embed(video)
    video[0, 2] += 1.0  # change frame 2 only
    moved = (model.embed(video) - base).abs().sum(-1)[0]
    K = 1 + cfg.U * cfg.V
    assert torch.nonzero(moved > 1e-6).flatten().tolist() == list(range(K + 2 * N, K + 3 * N))


def test_temporal_module_is_identity_at_init(tower):
    model, cfg = tower
    z = torch.randn(2, cfg.frames * model.N, cfg.width)
    for layer in range(cfg.layers):
        assert torch.equal(model.local_temporal(z, layer), z)


def test_vidla_layer_at_init_equals_per_frame_clip_plus_new_tokens(tower):
    # With the temporal branch zero, a patch of frame t sees exactly [MST; patches of t], so its
    # output equals CLIP's layer run on that frame's patches with the MST tokens prepended; and
    # [CLS] sees everything, so its output equals the unmasked layer's [CLS] output.
    model, cfg = tower
    K, N = cfg.U * cfg.V, model.N
    clip_layers = model.clip.vision_model.encoder.layers
    z = torch.randn(2, 1 + K + cfg.frames * N, cfg.width)
    for layer in range(cfg.layers):
        out = model.block(z, layer)
        for t in range(cfg.frames):
            frame = z[:, 1 + K + t * N:1 + K + (t + 1) * N]
            ref = clip_layers[layer](torch.cat([z[:, 1:1 + K], frame], 1), None)[:, K:]
            torch.testing.assert_close(out[:, 1 + K + t * N:1 + K + (t + 1) * N], ref,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 0], clip_layers[layer](z, None)[:, 0],
                                   atol=1e-5, rtol=1e-5)


def _global_step(model, z):
    return model.clip.vision_model.encoder.layers[0](z, model.global_mask)


def test_information_flow_follows_global_mask(tower):
    model, cfg = tower
    K, N = cfg.U * cfg.V, model.N
    torch.manual_seed(1)
    z = torch.randn(1, 1 + K + cfg.frames * N, cfg.width)
    base = _global_step(model, z)
    # (i) perturb frame 1 (odd): level >= 1 MST unchanged; level-0 MST and CLS change
    z1 = z.clone()
    z1[:, 1 + K + N:1 + K + 2 * N] += torch.randn(N, cfg.width)
    out = _global_step(model, z1)
    d = (out - base).abs().amax(-1)[0]
    for i in range(K):
        if i // cfg.V >= 1:
            assert d[1 + i] < 1e-6
        else:
            assert d[1 + i] > 1e-4
    assert d[0] > 1e-4
    # (ii) patches of other frames are unchanged (same MST/CLS inputs)
    for t in range(cfg.frames):
        block = d[1 + K + t * N:1 + K + (t + 1) * N]
        assert (block > 1e-4).all() if t == 1 else (block < 1e-6).all()
    # (iii) perturbing CLS changes nothing but CLS
    z3 = z.clone()
    z3[:, 0] += torch.randn(cfg.width)
    d3 = (_global_step(model, z3) - base).abs().amax(-1)[0]
    assert d3[0] > 1e-4 and (d3[1:] < 1e-6).all()


def test_meanp_is_order_blind_vidla_is_not():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    clip = vidla.make_clip(cfg)
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    rev = video.flip(1)
    meanp = vidla.MeanPoolCLIP(clip).eval()
    torch.testing.assert_close(meanp.encode_video(video), meanp.encode_video(rev),
                               atol=1e-6, rtol=1e-5)
    model = vidla.VidLA(clip, cfg).eval()
    with torch.no_grad():
        model.temporal_pos.normal_(std=0.5)
    assert (model.encode_video(video) - model.encode_video(rev)).abs().max() > 1e-3


def test_video_embedding_is_read_from_cls(tower):
    # v = W_proj LN_post(Z^L[CLS]); nothing attends to [CLS], so its input embedding can only
    # reach v through the [CLS] row itself.
    model, cfg = tower
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    vm = model.clip.vision_model
    with torch.no_grad():
        z = vm.pre_layrnorm(model.embed(video))
        for layer in range(cfg.layers):
            z = model.block(z, layer)
        want = torch.nn.functional.normalize(
            model.clip.visual_projection(vm.post_layernorm(z[:, 0])), dim=-1)
        torch.testing.assert_close(model.encode_video(video), want)
        a = model.encode_video(video)
        bump = torch.randn(cfg.width)  # not a constant shift, which pre-LN would remove
        vm.embeddings.class_embedding.add_(bump)
        b = model.encode_video(video)
        vm.embeddings.class_embedding.sub_(bump)
    assert (a - b).abs().max() > 1e-4


def _one_step_loss(model, cfg, seed=0):
    rng = np.random.default_rng(seed)
    b = vidla.make_clips(rng, [1, 2, 4, 2], cfg)
    v = model.encode_video(b["video"])
    c = vidla.encode_text(model.clip, b["caption"])
    s = vidla.encode_text(model.clip, b["subtitle"])
    return vidla.vidla_loss(v, s, c, vidla.logit_scale_of(model.clip))


def test_gradients_reach_new_modules_and_clip():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = vidla.VidLA(vidla.make_clip(cfg), cfg)
    _one_step_loss(model, cfg).backward()
    nz = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
    assert nz["mst"] and nz["temporal_pos"]
    assert nz["local_attn.0.out_proj.weight"] and nz["local_attn.1.out_proj.weight"]
    # W_O = 0 blocks the gradient to W_Q, W_K, W_V at init (exactly zero), not afterwards
    assert not nz["local_attn.0.in_proj_weight"]
    assert nz["clip.vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert nz["clip.vision_model.embeddings.patch_embedding.weight"]
    assert nz["clip.text_model.embeddings.token_embedding.weight"]
    assert nz["clip.logit_scale"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    _one_step_loss(model, cfg, seed=1).backward()
    assert model.local_attn[0].in_proj_weight.grad.abs().sum() > 0


def test_freeze_clip_trains_only_new_modules():
    torch.manual_seed(0)
    cfg = tiny_cfg(freeze_clip=True, no_temporal_pos=True)
    model = vidla.VidLA(vidla.make_clip(cfg), cfg)
    _one_step_loss(model, cfg).backward()
    for n, p in model.named_parameters():
        if n.startswith("clip.") or n == "temporal_pos":
            assert p.grad is None, n
    assert model.mst.grad.abs().sum() > 0
    assert model.local_attn[0].out_proj.weight.grad.abs().sum() > 0


def test_cls_uses_mst_tokens(tower):
    model, cfg = tower
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    with torch.no_grad():
        a = model.encode_video(video)
        saved = model.mst.clone()
        model.mst.zero_()
        b = model.encode_video(video)
        model.mst.copy_(saved)
    assert (a - b).abs().max() > 1e-5


# ---------------------------------------------------------------- Eq. (3)
@pytest.mark.exercise
def test_info_nce_hand_value():
    eye = torch.eye(2)
    # both directions added: 2 * log(1 + e^-1)
    val = vidla.info_nce(eye, eye, torch.tensor(1.0))
    assert abs(val.item() - 2 * math.log(1 + math.exp(-1))) < 1e-6
    assert abs(val.item() - 0.626523) < 1e-5


def _naive_info_nce(v, t, scale):
    B = len(v)
    total = 0.0
    for i in range(B):
        v2t = [math.exp(scale * float(v[i] @ t[j])) for j in range(B)]
        t2v = [math.exp(scale * float(t[i] @ v[j])) for j in range(B)]
        total += -math.log(v2t[i] / sum(v2t)) - math.log(t2v[i] / sum(t2v))
    return total / B


@pytest.mark.exercise
def test_info_nce_matches_naive_loop_and_is_symmetric():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(5, 7), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(5, 7), dim=-1)
    got = vidla.info_nce(v, t, torch.tensor(3.0)).item()
    assert abs(got - _naive_info_nce(v, t, 3.0)) < 1e-5
    assert abs(got - vidla.info_nce(t, v, torch.tensor(3.0)).item()) < 1e-5


def test_info_nce_goes_to_zero_as_temperature_goes_to_zero():
    eye = torch.eye(3)
    assert vidla.info_nce(eye, eye, torch.tensor(100.0)).item() < 1e-12
    assert vidla.info_nce(eye, eye, torch.tensor(1.0)) > vidla.info_nce(eye, eye,
                                                                        torch.tensor(5.0))


def test_vidla_loss_sums_subtitle_and_caption_terms():
    torch.manual_seed(0)
    v, s, c = (torch.nn.functional.normalize(torch.randn(4, 6), dim=-1) for _ in range(3))
    scale = torch.tensor(2.0)
    both = vidla.vidla_loss(v, s, c, scale)
    torch.testing.assert_close(both, vidla.info_nce(v, s, scale) + vidla.info_nce(v, c, scale))
    torch.testing.assert_close(vidla.vidla_loss(v, c, c, scale), 2 * vidla.info_nce(v, c, scale))
    torch.testing.assert_close(vidla.vidla_loss(v, None, c, scale), vidla.info_nce(v, c, scale))


# ---------------------------------------------------------------- retrieval metrics
def test_retrieval_ranks_and_recall_by_hand():
    # 4 queries, 4 gallery items; queries 0 and 1 share a key ("A"), so both gallery A's count.
    keys = ["A", "A", "B", "C"]
    sim = torch.tensor([
        [0.1, 0.9, 0.5, 0.0],  # best is item 1 (A) -> rank 1
        [0.2, 0.1, 0.9, 0.8],  # order 2, 3, 0 -> first A at position 3
        [0.9, 0.8, 0.7, 0.6],  # order 0, 1, 2 -> B at 3
        [0.1, 0.2, 0.3, 0.9],  # C first -> 1
    ])
    ranks = vidla.retrieval_ranks(sim, keys, keys)
    assert ranks.tolist() == [1, 3, 3, 1]
    stats = vidla.recall_stats(np.array([1, 3, 5, 1, 7, 2, 6]))
    assert stats["R@1"] == pytest.approx(2 / 7)
    assert stats["R@5"] == pytest.approx(5 / 7)  # rank 5 counts, rank 6 does not
    assert stats["MdR"] == pytest.approx(3.0)
    assert vidla.recall_stats(np.array([1, 2, 6, 9]))["MdR"] == pytest.approx(4.0)


# ---------------------------------------------------------------- data
def test_toy_data_sampling_and_tokens():
    assert vidla.uniform_frame_ids(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert vidla.uniform_frame_ids(8, 8).tolist() == list(range(8))
    assert vidla.EOS != 2 and vidla.VOCAB[vidla.EOS] == "<eos>"
    names = list(vidla.COLOURS)
    seq = (names.index("red"), names.index("blue"))
    words = [vidla.VOCAB[i] for i in vidla.caption_tokens(seq) if i != vidla.PAD]
    assert words == ["<sos>", "red", "then", "blue", "<eos>"]
    words = [vidla.VOCAB[i] for i in vidla.subtitle_tokens(seq) if i != vidla.PAD]
    assert words == ["<sos>", "blue", "red", "<eos>"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = vidla.sample_events(rng, 4)
        assert len(s) == 4 and all(a != b for a, b in zip(s, s[1:]))
    cfg = vidla.Config()
    b = vidla.make_clips(rng, [1, 4], cfg)
    assert b["video"].shape == (2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    # the long clip: frames 2k and 2k+1 of the sample come from event k
    vid = b["video"][1]
    for k, c in enumerate(b["seqs"][1]):
        rgb = torch.tensor(list(vidla.COLOURS.values())[c])
        for f in (2 * k, 2 * k + 1):
            bright = vid[f].flatten(1).amax(1)
            assert torch.allclose(bright, rgb, atol=0.6)


def test_text_tower_pools_at_eos():
    torch.manual_seed(0)
    clip = vidla.make_clip(tiny_cfg())
    assert clip.config.text_config.eos_token_id == vidla.EOS
    a = torch.tensor([vidla.caption_tokens((0, 1))])
    b = a.clone()
    b[0, -1] = vidla.THEN  # a token after <eos> (where padding sits) must not matter
    torch.testing.assert_close(vidla.encode_text(clip, a), vidla.encode_text(clip, b))


# ---------------------------------------------------------------- smoke run
@pytest.mark.slow
def test_quick_run_smoke_schema_and_determinism(tmp_path):
    out = vidla.train(vidla.Config(quick=True, out_dir=str(tmp_path / "a")))
    for name in ("meanP", "VidLA"):
        h = np.array(out["history"][name])
        assert np.isfinite(h).all()
        assert h[-5:].mean() < h[:5].mean()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline"}
    assert summary["folder"] == "vidla" and summary["config"]["steps"] == vidla.QUICK["steps"]
    assert len(summary["headline"]) == 3
    for row in summary["headline"]:
        assert set(row) == {"metric", "higher_is_better", "method", "baseline"}
        assert 0.0 <= row["method"]["value"] <= 1.0 and 0.0 <= row["baseline"]["value"] <= 1.0
    assert all(np.isfinite(v) for v in summary["metrics"].values())
    assert (tmp_path / "a" / "vidla_recall_by_length.png").exists()
    assert (tmp_path / "a" / "vidla_mask.png").exists()
    again = vidla.train(vidla.Config(quick=True, out_dir=str(tmp_path / "b")))
    assert again["history"]["VidLA"] == out["history"]["VidLA"]
    same = {k: v for k, v in again["metrics"].items() if k != "cpu_seconds"}
    assert same == {k: v for k, v in out["metrics"].items() if k != "cpu_seconds"}
    assert same["VidLA_long_t2v_R@1"] == out["metrics"]["VidLA_long_t2v_R@1"]


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--width", "30"]):
        with pytest.raises(SystemExit) as e:
            vidla.parse_args(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err
