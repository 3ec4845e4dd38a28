"""Tests for vidla/train.py: masks, Eq. (1) reshape, Eq. (3) loss, retrieval metrics, the
zero-init identity, information flow under the mask, gradients, and a smoke run."""

import copy
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
@pytest.mark.exercise(1)
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


@pytest.mark.exercise(1)
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


@pytest.mark.exercise(2)
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
    meanp = vidla.MeanPoolCLIP(clip, cfg.frames).eval()
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
@pytest.mark.exercise(3)
def test_info_nce_hand_value():
    eye = torch.eye(2)
    # both directions added: 2 * log(1 + e^-1)
    val = vidla.info_nce(eye, eye, torch.tensor(1.0))
    assert abs(val.item() - 2 * math.log(1 + math.exp(-1))) < 1e-6
    assert abs(val.item() - 0.626523) < 1e-5
    _info_nce_asymmetric_hand_value()


def _naive_info_nce(v, t, scale):
    B = len(v)
    total = 0.0
    for i in range(B):
        v2t = [math.exp(scale * float(v[i] @ t[j])) for j in range(B)]
        t2v = [math.exp(scale * float(t[i] @ v[j])) for j in range(B)]
        total += -math.log(v2t[i] / sum(v2t)) - math.log(t2v[i] / sum(t2v))
    return total / B


@pytest.mark.exercise(3)
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
    words = [vidla.VOCAB[i] for i in vidla.caption_tokens(seq + (0,), (1, 0)) if i != vidla.PAD]
    assert words == ["<sos>", "red", "jump", "blue", "then", "red", "<eos>"]
    words = [vidla.VOCAB[i] for i in vidla.subtitle_tokens(seq) if i != vidla.PAD]
    assert words == ["<sos>", "blue", "red", "<eos>"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = vidla.sample_events(rng, 4)
        assert len(s) == 4 and all(a != b for a, b in zip(s, s[1:]))
    assert vidla.sample_links(rng, 4, "clock") == (0, 0, 0)
    for toy in vidla.TOYS:
        cfg = vidla.Config(toy=toy)
        b = vidla.make_clips(rng, [1, 4], cfg)
        assert b["video"].shape == (2, cfg.frames, 3, vidla.IMG, vidla.IMG)
        # the long clip: frames 2k and 2k+1 of the sample come from event k
        vid = b["video"][1]
        seq, links = b["keys"][1]
        assert len(links) == 3 and b["keys"][0][1] == ()
        assert b["frame_colours"][1].tolist() == [c for c in seq for _ in range(2)]
        for k, c in enumerate(seq):
            rgb = torch.tensor(list(vidla.COLOURS.values())[c])
            for f in (2 * k, 2 * k + 1):
                bright = vid[f].flatten(1).amax(1)
                assert torch.allclose(bright, rgb, atol=0.6)


def _corner(frame):
    """Top-left corner of the square in a (3, H, W) frame (the brightest 5x5 block)."""
    box = torch.nn.functional.avg_pool2d(frame.amax(0)[None, None], vidla.SQUARE, stride=1)[0, 0]
    k = int(box.argmax())
    return divmod(k, box.shape[1])


def test_relay_hand_overs_stay_in_place_or_jump_far():
    # "then": the next square starts where the last one ended; "jump": >= JUMP_MIN away.
    cfg = vidla.Config(toy="relay", noise=0.0, frames=32, event_frames=8)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(6):
        b = vidla.make_clips(rng, [4], cfg)
        vid, links = b["video"][0], b["keys"][0][1]
        for k, link in enumerate(links):
            end = _corner(vid[8 * k + 7])  # last raw frame of event k
            start = _corner(vid[8 * (k + 1)])  # first raw frame of event k + 1
            dist = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
            assert dist == 0 if link == 0 else dist >= vidla.JUMP_MIN
            seen.add(link)
    assert seen == {0, 1}
    for _ in range(100):
        prev = tuple(int(v) for v in rng.integers(0, vidla.IMG - vidla.SQUARE + 1, size=2))
        y, x = vidla.jump_start(rng, prev)
        assert max(abs(y - prev[0]), abs(x - prev[1])) >= vidla.JUMP_MIN
        assert 0 <= y <= vidla.IMG - vidla.SQUARE and 0 <= x <= vidla.IMG - vidla.SQUARE


def test_text_tower_pools_at_eos():
    torch.manual_seed(0)
    clip = vidla.make_clip(tiny_cfg())
    assert clip.config.text_config.eos_token_id == vidla.EOS
    a = torch.tensor([vidla.caption_tokens((0, 1))])
    b = a.clone()
    b[0, -1] = vidla.THEN  # a token after <eos> (where padding sits) must not matter
    torch.testing.assert_close(vidla.encode_text(clip, a), vidla.encode_text(clip, b))


# ---------------------------------------------------------------- meanP, the ladder, evaluation
@pytest.mark.exercise(4)
def test_meanp_normalises_each_frame_before_averaging():
    # Frame 0 has a 10x larger embedding than frame 1. meanP normalises each frame first, so both
    # count equally: mean([1, 0], [0, 1]) -> [1, 1] / sqrt(2). Averaging before normalising would
    # give [10, 1] / sqrt(101), dominated by frame 0.
    cfg = tiny_cfg(frames=2)
    model = vidla.MeanPoolCLIP(vidla.make_clip(cfg), cfg.frames)
    feats = torch.tensor([[[10.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [0.0, -2.0]]])  # (B=2, T=2, D=2)
    model.frame_features = lambda video: feats
    v = model.encode_video(torch.zeros(2, 2, 3, vidla.IMG, vidla.IMG))
    want = torch.tensor([[1.0, 1.0], [0.6, -0.2]])  # [0.6, 0.8] + [0, -1], halved: [0.3, -0.1]
    torch.testing.assert_close(v, torch.nn.functional.normalize(want, dim=-1))


def test_meanp_frame_features_equal_clip_image_features():
    # Without the clock, meanP's own per-frame forward is exactly CLIP's image tower.
    torch.manual_seed(0)
    cfg = tiny_cfg()
    clip = vidla.make_clip(cfg).eval()
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    with torch.no_grad():
        ref = clip.get_image_features(pixel_values=video.flatten(0, 1)).pooler_output
        got = vidla.MeanPoolCLIP(clip, cfg.frames).frame_features(video)
    torch.testing.assert_close(got, ref.view(2, cfg.frames, -1), atol=1e-5, rtol=1e-5)


def test_meanp_with_temporal_position_is_a_clock():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    clip = vidla.make_clip(cfg).eval()
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    plain = vidla.MeanPoolCLIP(clip, cfg.frames)
    clock = vidla.MeanPoolCLIP(clip, cfg.frames, temporal_pos=True)
    assert plain.temporal_pos is None and clock.temporal_pos.shape == (1, cfg.frames, 1, cfg.width)
    # zero-initialised: the clock starts exactly at meanP
    torch.testing.assert_close(clock.encode_video(video), plain.encode_video(video))
    with torch.no_grad():
        clock.temporal_pos.normal_(std=0.5)
    assert (clock.encode_video(video) - clock.encode_video(video.flip(1))).abs().max() > 1e-3
    clock.encode_video(video).sum().backward()
    assert clock.temporal_pos.grad.abs().sum() > 0


def test_ladder_adds_one_ingredient_per_rung():
    torch.manual_seed(0)
    cfg = tiny_cfg(U=2, V=2)
    clip = vidla.make_clip(cfg)
    rungs = {}
    for name in vidla.LADDER:
        torch.manual_seed(7)  # as train() does before every rung
        rungs[name] = vidla.build_rung(name, copy.deepcopy(clip), cfg)
    assert rungs["meanP"].temporal_pos is None
    assert rungs["meanP+TP"].temporal_pos is not None
    one, hier, full = rungs["TP+MST"], rungs["TP+MST+hier"], rungs["VidLA"]
    assert (one.U, one.V, one.local) == (1, 4, False)
    assert (hier.U, hier.V, hier.local) == (2, 2, False)
    assert (full.U, full.V, full.local) == (2, 2, True)
    assert one.local_attn is None and hier.local_attn is None and full.local_attn is not None
    # the same [MST] tokens (same count, same seed) on the three VidLA-tower rungs
    torch.testing.assert_close(one.mst, hier.mst)
    torch.testing.assert_close(hier.mst, full.mst)
    # one level: every [MST] token sees every frame; with the hierarchy, level 1 sees half of them
    K, N = 4, one.N
    A1, A2 = allowed(one.global_mask[0, 0]), allowed(hier.global_mask[0, 0])
    assert A1[1:1 + K, 1 + K:].sum() == K * cfg.frames * N
    assert A2[1 + 2:1 + K, 1 + K:].sum() == 2 * (cfg.frames // 2) * N
    # TP+MST and TP+MST+hier differ only in the mask; VidLA adds the Eq. (1) modules
    shapes = {n: {k: p.shape for k, p in m.named_parameters()} for n, m in rungs.items()}
    assert shapes["TP+MST"] == shapes["TP+MST+hier"]
    extra = set(shapes["VidLA"]) - set(shapes["TP+MST+hier"])
    assert extra and all(k.startswith("local_") for k in extra)
    # the ablated rung still runs, and its block skips Eq. (1)
    video = torch.randn(2, cfg.frames, 3, vidla.IMG, vidla.IMG)
    assert hier.encode_video(video).shape == (2, cfg.width)
    z = torch.randn(1, 1 + K + cfg.frames * N, cfg.width)
    layer0 = hier.clip.vision_model.encoder.layers[0]
    torch.testing.assert_close(hier.block(z, 0), layer0(z, hier.global_mask))


class _FixedEmbeddings(nn.Module):
    """A stand-in model whose video and caption embeddings are given."""

    def __init__(self, v, c):
        super().__init__()
        self.v, self.c = v, c

    def encode_video(self, video):
        return self.v

    def encode_text(self, ids):
        return self.c


def test_evaluate_ranks_videos_per_caption_for_t2v_and_captions_per_video_for_v2t():
    # sim[i, j] = caption i . video j. Rows (t2v): caption 0 -> video 0 (hit), caption 1 ->
    # video 0 (miss), caption 2 -> video 2 (hit): R@1 2/3. Columns (v2t): video 0 -> caption 1
    # (miss), video 1 -> caption 0 (miss), video 2 -> caption 2 (hit): R@1 1/3.
    sim = torch.tensor([[0.9, 0.6, 0.0], [0.95, 0.5, 0.0], [0.0, 0.2, 0.8]])
    model = _FixedEmbeddings(v=sim.T.clone(), c=torch.eye(3))
    test = {"long": {"video": torch.zeros(3, 1), "caption": torch.zeros(3, 1),
                     "keys": ["a", "b", "c"]}}
    res = vidla.evaluate(model, test)["long"]
    assert res["t2v"]["R@1"] == pytest.approx(2 / 3)
    assert res["v2t"]["R@1"] == pytest.approx(1 / 3)
    # caption 1's video 1 sits at rank 2; video 0's caption 0 at rank 2, video 1's caption 1 at 3
    assert res["t2v"]["MdR"] == pytest.approx(1.0) and res["v2t"]["MdR"] == pytest.approx(2.0)
    assert model.training  # evaluate puts the model back in training mode


def test_ceilings_by_hand():
    # groups by view: {0, 1, 2} (keys A, A, B) and {3, 4} (keys C, D)
    keys, views = ["A", "A", "B", "C", "D"], ["x", "x", "x", "y", "y"]
    assert vidla.ceiling_r1(keys, views) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 0.5 + 0.5) / 5)
    assert vidla.ceiling_r1(keys, keys) == 1.0
    # "red then blue" and "blue then red": one bag of frame colours, two frame orders
    data = {"keys": [((0, 2), (0,)), ((2, 0), (0,))], "frame_colours": np.array([[0, 2], [2, 0]])}
    assert vidla.gallery_ceilings(data) == {"orderblind": 0.5, "clock": 1.0}
    # the relay toy: same frames, different hand-over: a clock cannot tell them apart
    data = {"keys": [((0, 2), (0,)), ((0, 2), (1,))], "frame_colours": np.array([[0, 2], [0, 2]])}
    assert vidla.gallery_ceilings(data) == {"orderblind": 0.5, "clock": 0.5}


def test_headline_claims_vidla_against_the_clock():
    values = {"meanP": 0.3, "meanP+TP": 0.5, "TP+MST": 0.6, "TP+MST+hier": 0.65, "VidLA": 0.7}
    results = {n: {b: {"t2v": {"R@1": v}} for b in vidla.BUCKETS} for n, v in values.items()}
    ceilings = {b: {"orderblind": 0.2, "clock": 0.55} for b in vidla.BUCKETS}
    rows = vidla.vidla_headline(results, ceilings, tiny_cfg(toy="relay"))
    first = next(r for r in rows if r["expect"] == "better")
    assert first["metric"].startswith("text->video R@1, medium")
    assert (first["method"]["name"], first["baseline"]["name"]) == ("VidLA", "meanP+TP")
    assert first["method"]["value"] == 0.7 and first["baseline"]["value"] == 0.5
    short = [r for r in rows if "short" in r["metric"]]
    assert [r["expect"] for r in short] == ["level"]
    assert short[0]["margin"] == vidla.SHORT_MARGIN and short[0]["margin_why"]
    ceil = [r for r in rows if r["baseline"]["name"] == "clock ceiling"]
    assert [r["baseline"]["value"] for r in ceil] == [0.55, 0.55]
    long = [r["expect"] for r in rows if "long" in r["metric"]
            and (r["method"]["name"], r["baseline"]["name"]) == ("VidLA", "meanP+TP")]
    assert long == ["report"]  # learning speed at the default budget (900-step tuning runs)
    assert [r["expect"] for r in ceil] == ["better", "report"]
    for bucket in ("medium", "long"):
        ladder = [(r["method"]["name"], r["baseline"]["name"]) for r in rows
                  if r["expect"] == "report" and bucket in r["metric"]
                  and r["baseline"]["name"] != "clock ceiling"
                  and (r["method"]["name"], r["baseline"]["name"]) != ("VidLA", "meanP+TP")]
        assert ladder == list(zip(vidla.LADDER[1:], vidla.LADDER))
    assert all(r["expect"] in ("report", "level")
               for r in vidla.vidla_headline(results, ceilings, tiny_cfg(toy="clock")))
    del results["meanP+TP"]
    assert all("meanP+TP" not in (r["method"]["name"], r["baseline"]["name"])
               for r in vidla.vidla_headline(results, ceilings, tiny_cfg()))


# ---------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    results = vidla.train(vidla.Config(quick=True, out_dir=str(out / "a")))
    return out, results, vidla.report(results)


@pytest.mark.slow
def test_quick_run_smoke_schema_and_determinism(quick_run):
    tmp_path, out, summary = quick_run
    for name in vidla.LADDER:
        h = np.array(out["history"][name])
        assert np.isfinite(h).all()
        assert h[-3:].mean() < h[:3].mean()
    assert summary == json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                            "premise", "arms"}
    assert summary["folder"] == "vidla" and summary["config"]["steps"] == vidla.QUICK["steps"]
    assert len(summary["headline"]) == 13
    for row in summary["headline"]:
        assert set(row) - {"margin", "margin_why"} == {"metric", "higher_is_better", "expect",
                                                       "method", "baseline"}
        assert 0.0 <= row["method"]["value"] <= 1.0 and 0.0 <= row["baseline"]["value"] <= 1.0
    assert all(np.isfinite(v) for v in summary["metrics"].values())
    m = summary["metrics"]
    for b in vidla.BUCKETS:  # no model can beat what it cannot see (up to gallery noise)
        assert m[f"ceiling_orderblind_{b}_t2v_R@1"] <= m[f"ceiling_clock_{b}_t2v_R@1"] <= 1.0
        assert m[f"meanP_{b}_t2v_R@1"] <= m[f"ceiling_orderblind_{b}_t2v_R@1"] + 0.25
    assert (tmp_path / "a" / "vidla_recall_by_length.png").exists()
    assert (tmp_path / "a" / "vidla_mask.png").exists()
    # Same seed, same numbers; and a rung's numbers do not depend on which other rungs ran
    # (every rung gets the same start, the same seeded new modules and the same batches).
    again = vidla.train(vidla.Config(quick=True, rungs="meanP+TP,VidLA",
                                     out_dir=str(tmp_path / "b")))
    assert again["history"]["VidLA"] == out["history"]["VidLA"]
    assert again["history"]["meanP+TP"] == out["history"]["meanP+TP"]
    for k, v in again["metrics"].items():
        if k != "cpu_seconds":
            assert v == out["metrics"][k], k


@pytest.mark.slow
def test_arms_record_one_start_one_stream_of_batches_and_each_rungs_lr(quick_run):
    # The design as data: every rung starts from the same pre-trained CLIP (one fingerprint),
    # sees the same batches (one first-batch fingerprint), with the configured lr and steps and
    # both text streams of Eq. (3).
    _, out, summary = quick_run
    arms = summary["arms"]
    assert list(arms) == list(vidla.LADDER)
    assert len({a["init_fingerprint"] for a in arms.values()}) == 1
    assert len({a["first_batch"] for a in arms.values()}) == 1
    cfg = out["cfg"]
    lrs = vidla.rung_lrs(cfg)
    for name, a in arms.items():
        assert a["lr"] == lrs[name] and a["steps"] == cfg.steps == len(out["history"]["VidLA"])
        assert a["text_streams"] == "caption+subtitle" and a["data"].startswith("relay clips")
        # checkpoint selection: evaluated at step 0, every eval_every steps and at the end; the
        # kept step is the first one with the best mean validation R@1
        steps = [p["step"] for p in a["val_curve"]]
        assert steps == sorted({0, cfg.steps, *range(cfg.eval_every, cfg.steps, cfg.eval_every)})
        scores = [np.mean([p[b] for b in vidla.BUCKETS]) for p in a["val_curve"]]
        assert a["best_step"] == steps[int(np.argmax(scores))]
        assert a["val_R1"] == pytest.approx(max(scores))
    # the shared start is the pre-trained CLIP, not a fresh one
    torch.manual_seed(cfg.seed)
    assert arms["VidLA"]["init_fingerprint"] != vidla.fingerprint(vidla.make_clip(cfg))


def test_premise_rows_say_the_relay_toy_needs_two_frames_and_the_clock_toy_does_not():
    rng = np.random.default_rng(0)
    for toy, holds in (("relay", True), ("clock", False)):
        cfg = vidla.Config(toy=toy, n_test=60)
        ceilings = {b: vidla.gallery_ceilings(d)
                    for b, d in vidla.make_dataset(cfg, rng).items()}
        rows = vidla.vidla_premise(ceilings)
        tested = [r for r in rows if r["cmp"] is not None]
        assert [r["holds"] for r in tested] == [holds, holds]
        for r in tested:
            b = r["name"].split()[0]
            assert r["value"] == pytest.approx(1 - ceilings[b]["clock"])


def test_a_hit_needs_the_hand_overs_too_not_only_the_colours():
    # Same colours, different hand-over: only the exact caption is a hit.
    keys = [((0, 2), (0,)), ((0, 2), (1,))]
    sim = torch.tensor([[0.1, 0.9], [0.9, 0.1]])  # each caption ranks the *other* video first
    assert vidla.retrieval_ranks(sim, keys, keys).tolist() == [2, 2]


def test_relay_captions_name_every_hand_over():
    cfg = vidla.Config(toy="relay")
    b = vidla.make_clips(np.random.default_rng(5), [4] * 20, cfg)
    for caption, (seq, links) in zip(b["caption"].tolist(), b["keys"]):
        words = [vidla.VOCAB[i] for i in caption if i not in (vidla.PAD, vidla.SOS, vidla.EOS)]
        assert words[1::2] == [vidla.LINKS[k] for k in links]
        assert words[0::2] == [list(vidla.COLOURS)[c] for c in seq]
    assert {k for _, links in b["keys"] for k in links} == {0, 1}


def test_text_embeddings_are_unit_rows():
    torch.manual_seed(0)
    clip = vidla.make_clip(tiny_cfg())
    ids = torch.tensor([vidla.caption_tokens((0, 1)), vidla.caption_tokens((2,)),
                        vidla.caption_tokens((3, 1, 0))])
    emb = vidla.encode_text(clip, ids)  # (3, D)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--width", "30"],
                 ["--seed", "-1"], ["--seed", str(2**32)], ["--toy", "movie"],
                 ["--rungs", "meanP,bogus"], ["--pretrain-lr", "-1"]):
        with pytest.raises(SystemExit) as e:
            vidla.parse_args(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err
    assert vidla.parse_args(["--pretrain-lr", "1e-4"]).lr == vidla.Config().lr


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        vidla.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert f"default: {vidla.Config().steps};" in out and "(default: relay)" in out


def test_bad_out_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        vidla.prepare_out_dir(str(blocker / "sub"))
    assert "error" in str(e.value) and len(str(e.value).splitlines()) == 1


def _info_nce_asymmetric_hand_value():
    """v = I, t = [(1, 0), (0.6, 0.8)], logit_scale 2: logits [[2, 1.2], [0, 1.6]]; video->text
    over the rows plus text->video over the columns, each a mean over the batch."""
    v = torch.eye(2)
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])

    def ce(row, y):
        return -row[y] + math.log(sum(math.exp(x) for x in row))

    want = (ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)) / 2 + (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    assert abs(vidla.info_nce(v, t, torch.tensor(2.0)).item() - want) < 1e-5


@pytest.mark.slow
def test_each_rung_is_restored_to_its_kept_checkpoint(quick_run):
    # The models train() returns are at the kept checkpoint, not at the last step: their
    # validation R@1 is the recorded best (plant: drop the load_state_dict and this fails on some
    # rung whose last checkpoint is not its best).
    _, out, summary = quick_run
    assert any(a["best_step"] != out["cfg"].steps for a in summary["arms"].values())
    for name, model in out["models"].items():
        r1 = vidla.evaluate(model, out["val"])
        score = np.mean([r1[b]["t2v"]["R@1"] for b in vidla.BUCKETS])
        assert score == pytest.approx(summary["arms"][name]["val_R1"]), name
    # the validation gallery is not the test gallery (its own rng stream)
    test_keys = vidla.make_dataset(out["cfg"], np.random.default_rng([out["cfg"].seed, 1]))
    assert out["val"]["long"]["keys"] != test_keys["long"]["keys"][:out["cfg"].n_val]


def test_rung_lr_overrides_lr_per_rung():
    cfg = vidla.Config(lr=2e-3, rung_lr="meanP+TP=1e-3,VidLA=4e-3")
    lrs = vidla.rung_lrs(cfg)
    assert lrs == {"meanP": 2e-3, "meanP+TP": 1e-3, "TP+MST": 2e-3, "TP+MST+hier": 2e-3,
                   "VidLA": 4e-3}
    assert vidla.rung_lrs(vidla.Config(lr=5e-4)) == dict.fromkeys(vidla.LADDER, 5e-4)
    # The defaults are each rung's rate tuned on seeds 100-102 (README, "Tuning"), and
    # --rung-lr still overrides them one rung at a time.
    assert vidla.rung_lrs(vidla.Config()) == vidla.TUNED_LR == {
        "meanP": 2e-3, "meanP+TP": 1e-3, "TP+MST": 2e-3, "TP+MST+hier": 2e-3, "VidLA": 1e-3}
    assert vidla.rung_lrs(vidla.Config(rung_lr="VidLA=4e-3"))["VidLA"] == 4e-3
    assert vidla.rung_lrs(vidla.Config(rung_lr="VidLA=4e-3"))["meanP+TP"] == 1e-3
    for bad in ("bogus=1e-3", "VidLA=-1"):
        with pytest.raises(SystemExit):
            vidla.parse_args(["--rung-lr", bad])


def test_each_rung_trains_with_its_own_lr():
    # fit() hands every rung its own rate: the optimiser state after one step differs in scale.
    cfg = vidla.Config(quick=True, rungs="meanP,meanP+TP", rung_lr="meanP=1e-3,meanP+TP=3e-3",
                       steps=1, batch_size=4, n_val=4, eval_every=1)
    torch.manual_seed(0)
    clip = vidla.make_clip(cfg)
    models = {n: vidla.build_rung(n, copy.deepcopy(clip), cfg) for n in ("meanP", "meanP+TP")}
    records = {n: {} for n in models}
    val = vidla.make_dataset(dataclasses_replace(cfg, n_test=4), np.random.default_rng(1))
    vidla.fit(models, cfg, np.random.default_rng(2), val, records)
    assert records["meanP"]["lr"] == 1e-3 and records["meanP+TP"]["lr"] == 3e-3
    # Adam's first step moves every weight by about lr (sign of the gradient): compare one that
    # both rungs share and that got a gradient. The kept checkpoint may be step 0 or 1, so compare
    # the larger of the two moves only when step 1 was kept.
    moved = {}
    for n, m in models.items():
        w = m.clip.visual_projection.weight
        moved[n] = (w - clip.visual_projection.weight).abs().max().item()
    for n, lr in (("meanP", 1e-3), ("meanP+TP", 3e-3)):
        if records[n]["best_step"] == 1:
            assert moved[n] == pytest.approx(lr, rel=0.05)
        else:
            assert moved[n] == 0.0


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_ceiling_hits_per_query_by_hand():
    keys, views = ["A", "A", "B", "C", "D"], ["x", "x", "x", "y", "y"]
    np.testing.assert_allclose(vidla.ceiling_hits(keys, views), [2 / 3, 2 / 3, 1 / 3, 0.5, 0.5])


def test_margins_carry_paired_standard_errors(capsys):
    # Two models on a 4-query gallery: hits [1, 1, 0, 1] vs [0, 1, 0, 0]; per-query differences
    # [1, 0, 0, 1]: mean 0.5, sample std sqrt(1/3), SE sqrt(1/3) / 2. The clock ceiling's hits
    # are its expected hits.
    hits = {"VidLA": np.array([1.0, 1, 0, 1]), "meanP+TP": np.array([0.0, 1, 0, 0])}
    results = {n: {b: {"t2v_hits": h} for b in vidla.BUCKETS} for n, h in hits.items()}
    ceiling_hits = {b: {"clock": np.array([0.5, 0.5, 0.5, 0.5])} for b in vidla.BUCKETS}
    rows = [{"metric": "text->video R@1, medium (2 events)", "expect": "better",
             "method": {"name": "VidLA"}, "baseline": {"name": "meanP+TP"}},
            {"metric": "text->video R@1, long (4 events)", "expect": "report",
             "method": {"name": "VidLA"}, "baseline": {"name": "clock ceiling"}}]
    out = vidla.print_margins(rows, results, ceiling_hits)
    assert out["margin_medium_VidLA_vs_meanP+TP"] == pytest.approx(0.5)
    assert out["margin_se_medium_VidLA_vs_meanP+TP"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert out["margin_long_VidLA_vs_clock_ceiling"] == pytest.approx(0.25)
    assert out["margin_se_long_VidLA_vs_clock_ceiling"] == pytest.approx(0.25)  # std 0.5 / 2
    assert out["VidLA_medium_t2v_R@1_se"] == pytest.approx(0.25)
    printed = capsys.readouterr().out
    assert "paired SE 0.289" in printed and "margin +0.500" in printed


def test_tuning_report_lr_rule_by_hand():
    """The README's lr rule as `tuning_report.choose` applies it: the best mean; anything under
    TIE below it is a tie, which keeps the old default 2e-3 when it is tied, else the smallest
    tied lr. Hand-made grids, one per branch."""
    from vidla import tuning_report as tr

    assert tr.TIE == 0.01 and tr.OLD_DEFAULT == 2e-3
    # a clear winner below the old default
    assert tr.choose({5e-4: 0.64, 1e-3: 0.73, 2e-3: 0.70, 4e-3: 0.48}) == 1e-3
    # a clear winner above it
    assert tr.choose({1e-3: 0.60, 2e-3: 0.62, 4e-3: 0.70}) == 4e-3
    # 1e-3 ahead by less than TIE: a tie, and the tie keeps 2e-3
    assert tr.choose({1e-3: 0.705, 2e-3: 0.700, 4e-3: 0.50}) == 2e-3
    # a tie that does not include 2e-3: the smallest tied lr
    assert tr.choose({5e-4: 0.702, 1e-3: 0.700, 2e-3: 0.65}) == 5e-4
    assert tr.choose({2e-3: 0.40, 4e-3: 0.700, 8e-3: 0.705}) == 4e-3
