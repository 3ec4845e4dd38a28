"""Tests for smile/train.py: routing, capacity, load balancing, the additive-router identity, the
two-hop All2All, the cost model (both message assumptions, Amdahl), paired initialisation, the
distributed path (gloo, 2 nodes x 2 GPUs) against the single-process layer, and a smoke run."""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from smile import train as smile

pytestmark = pytest.mark.smile


SUMMARY_KEYS = {"folder", "seed", "config", "wall_seconds", "metrics", "headline", "premise",
                "arms"}


def small_cfg(**kw):
    base = dict(nodes=2, gpus_per_node=2, d_model=8, d_ff=16, n_heads=2, vocab=16, seq_len=8,
                batch=8, cf=1.0, cf1=1.0, cf2=1.0)
    base.update(kw)
    return smile.Config(**base)


# ---------------------------------------------------------------- tier 1: hand values
def test_capacity_formula():
    assert smile.capacity(128, 8, 1.25) == 20  # ceil(1.25 * 128 / 8)
    assert smile.capacity(128, 2, 1.25) == 80
    assert smile.capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert smile.capacity(10, 4, None) == 10  # no drops
    assert smile.capacity(3, 8, 1.0) == 1


def test_top1_route_hand_example():
    # 5 tokens, 2 experts, capacity 2. Argmax: 0, 1, 0, 0, 1 -> expert 0 gets tokens 0, 2, (3
    # dropped); expert 1 gets tokens 1, 4.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.5]]])
    r = smile.top1_route(logits, 2)
    assert r.expert.tolist() == [[0, 1, 0, 0, 1]]
    assert r.loc.tolist() == [[0, 0, 1, 2, 1]]
    assert r.keep.tolist() == [[True, True, True, False, True]]
    want = torch.zeros(1, 5, 2, 2)
    want[0, 0, 0, 0] = want[0, 1, 1, 0] = want[0, 2, 0, 1] = want[0, 4, 1, 1] = 1
    assert torch.equal(r.dispatch, want)
    gate = torch.sigmoid(torch.tensor([2.0, 1.0, 1.0, 3.0, 0.5]))  # 2-way softmax = sigmoid
    assert torch.allclose(r.gate[0], gate)
    assert torch.allclose(r.combine, want * gate[None, :, None, None])
    assert torch.allclose(r.probs.sum(-1), torch.ones(1, 5))


def test_top1_route_skips_padding():
    logits = torch.zeros(1, 4, 2)
    logits[..., 1] = 1.0  # everyone wants expert 1
    valid = torch.tensor([[False, True, False, True]])
    r = smile.top1_route(logits, 1, valid=valid)
    # the first *valid* token (index 1) takes the only slot; padding is never routed
    assert r.keep.tolist() == [[False, True, False, False]]
    assert r.dispatch[0, 1, 1, 0] == 1 and r.dispatch.sum() == 1


def test_lb_loss_hand_values():
    p = torch.tensor([[[.9, .1], [.8, .2], [.3, .7], [.4, .6]]])
    # f = [.5, .5], P = [.6, .4] -> 2 * (.5 * .6 + .5 * .4) = 1.0
    assert torch.allclose(smile.load_balancing_loss(p, p.argmax(-1), 1.0), torch.tensor([1.0]))
    # everything to expert 0 with p = [1, 0]: E * 1 * 1 = 2 (the maximum), times alpha = 0.1
    p0 = torch.tensor([[[1.0, 0.0]] * 4])
    out = smile.load_balancing_loss(p0, p0.argmax(-1), 0.1)
    assert torch.allclose(out, torch.tensor([0.2]))
    # alpha scales linearly
    assert torch.allclose(smile.load_balancing_loss(p, p.argmax(-1), 0.01), torch.tensor([0.01]))


@pytest.mark.exercise(1)
def test_exercise1_lb_loss_is_alpha_at_uniform_routing():
    E, T = 4, 8
    probs = torch.full((3, T, E), 1 / E)  # (G, T, E) uniform probabilities
    expert = torch.arange(T).remainder(E).expand(3, T)  # perfectly balanced argmax
    out = smile.load_balancing_loss(probs, expert, 0.01)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 0.01))
    _lb_loss_hand_values()


@pytest.mark.exercise(1)
def test_exercise1_lb_loss_hand_value_and_valid_mask():
    _lb_loss_hand_values()


@pytest.mark.exercise(1)
def test_exercise1_lb_gradient_flows_only_through_P():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 3, requires_grad=True)
    probs = logits.softmax(-1)
    probs.retain_grad()
    expert = probs.argmax(-1)
    smile.load_balancing_loss(probs, expert, 0.5).sum().backward()
    f = torch.nn.functional.one_hot(expert, 3).float().mean(1)  # (G, E)
    # d/dp_i(x) of alpha * E * sum_i f_i * mean_x p_i(x) = alpha * E * f_i / T
    want = (0.5 * 3 * f / 6)[:, None, :].expand(2, 6, 3)
    assert torch.allclose(probs.grad, want)
    _lb_loss_hand_values()


# ---------------------------------------------------------------- cost model
@pytest.mark.exercise(2)
def test_exercise2_alltoall_cost_matches_worked_example():
    # the worked example in the notes: M = 8, d = 1024, bf16, cf = 1
    # (the notes' link constants, 10 us and 2 us, not the cited defaults)
    links = dict(smile.LINKS, lat_slow=10e-6, lat_fast=2e-6)
    for N, T, flat_ms, smile_ms in ((2, 4096, 0.78, 0.72), (8, 4096, 1.75, 1.28),
                                    (16, 512, 1.37, 0.32)):
        c = smile.alltoall_cost(N, 8, T, 1024, 2, 1.0, 1.0, 1.0, links=links)
        assert c["flat_time"] * 1e3 == pytest.approx(flat_ms, abs=0.006)
        assert c["smile_time"] * 1e3 == pytest.approx(smile_ms, abs=0.006)
        assert c["flat_slow_msgs"] == (N - 1) * 8 and c["smile_slow_msgs"] == N - 1
        assert c["flat_fast_msgs"] == 7 and c["smile_fast_msgs"] == 7
    _alltoall_cost_hand_example_with_three_capacity_factors()


@pytest.mark.exercise(2)
def test_exercise2_slow_bytes_equal_and_hand_example():
    # N = 2, M = 2, T = 4, d = 1, 1 byte, cf = 1: S = 4 bytes; flat sends S/P = 1 byte to each of
    # (N-1) M = 2 GPUs on the other node; SMILE sends S1/N = 2 bytes to 1 GPU.
    c = smile.alltoall_cost(2, 2, 4, 1, 1, 1.0, 1.0, 1.0)
    assert (c["flat_slow_msgs"], c["flat_slow_bytes"]) == (2, 2.0)
    assert (c["smile_slow_msgs"], c["smile_slow_bytes"]) == (1, 2.0)
    assert (c["flat_fast_msgs"], c["flat_fast_bytes"]) == (1, 1.0)
    assert (c["smile_fast_msgs"], c["smile_fast_bytes"]) == (1, 2.0)
    k = smile.LINKS
    a_s, a_f, g_s = k["lat_slow"], k["lat_fast"], k["gap_slow"]
    b_s, b_f = 1 / k["bw_slow"], 1 / k["bw_fast"]
    assert c["flat_time"] == pytest.approx(2 * (a_s + b_s) + (a_f + b_f))
    assert c["smile_time"] == pytest.approx((a_s + 2 * b_s) + (a_f + 2 * b_f))
    # pipelined: the second slow message pays a gap, not a latency; links in parallel for flat
    assert c["flat_time_pipelined"] == pytest.approx(max(a_s + g_s + 2 * b_s, a_f + b_f))
    assert c["smile_time_pipelined"] == pytest.approx((a_s + 2 * b_s) + (a_f + 2 * b_f))
    # overlapped: one latency per link and hop; flat's two links in parallel, SMILE's hops in series
    assert c["flat_time_overlap"] == pytest.approx(max(a_s + 2 * b_s, a_f + b_f))
    assert c["smile_time_overlap"] == pytest.approx((a_s + 2 * b_s) + (a_f + 2 * b_f))
    big = smile.alltoall_cost(16, 8, 2048, 512, 2, 1.25, 1.25, 1.0)
    assert big["flat_slow_bytes"] == pytest.approx(big["smile_slow_bytes"])
    _alltoall_cost_hand_example_with_three_capacity_factors()


@pytest.mark.exercise(2)
def test_exercise2_cost_model_uses_each_capacity_factor():
    base = smile.alltoall_cost(4, 4, 64, 8, 1, 1.0, 1.0, 1.0)
    c1 = smile.alltoall_cost(4, 4, 64, 8, 1, 1.0, 2.0, 1.0)  # cf1 doubles both SMILE hops
    assert c1["smile_slow_bytes"] == pytest.approx(2 * base["smile_slow_bytes"])
    assert c1["smile_fast_bytes"] == pytest.approx(2 * base["smile_fast_bytes"])
    assert c1["flat_slow_bytes"] == base["flat_slow_bytes"]
    c2 = smile.alltoall_cost(4, 4, 64, 8, 1, 1.0, 1.0, 3.0)  # cf2 only the intra-node hop
    assert c2["smile_slow_bytes"] == base["smile_slow_bytes"]
    assert c2["smile_fast_bytes"] == pytest.approx(3 * base["smile_fast_bytes"])
    c = smile.alltoall_cost(4, 4, 64, 8, 1, 1.5, 1.0, 1.0)  # cf only the flat buffer
    assert c["flat_slow_bytes"] == pytest.approx(1.5 * base["flat_slow_bytes"])
    assert c["smile_slow_bytes"] == base["smile_slow_bytes"]
    _alltoall_cost_hand_example_with_three_capacity_factors()


@pytest.mark.exercise(2)
def test_exercise2_pipelined_lies_between_sequential_and_overlapped():
    for N, T in ((2, 64), (16, 512), (32, 65536)):
        c = smile.alltoall_cost(N, 8, T, 1024, 2, 1.25, 1.25, 1.0)
        for who in ("flat", "smile"):
            assert c[f"{who}_time_overlap"] <= c[f"{who}_time_pipelined"] <= c[f"{who}_time"]
        no_gap = smile.alltoall_cost(N, 8, T, 1024, 2, 1.25, 1.25, 1.0,
                                     links=dict(smile.LINKS, gap_slow=0.0, gap_fast=0.0))
        assert no_gap["flat_time_pipelined"] == pytest.approx(no_gap["flat_time_overlap"])
        # a gap larger than the latency is capped at it
        big = smile.alltoall_cost(N, 8, T, 1024, 2, 1.25, 1.25, 1.0,
                                  links=dict(smile.LINKS, gap_slow=1.0, gap_fast=1.0))
        assert big["smile_time_pipelined"] == pytest.approx(big["smile_time"])
    _alltoall_cost_hand_example_with_three_capacity_factors()


def test_link_constants_are_the_cited_ones():
    # NCCL's tuning table (Simple: NET 9.6 us, NVLink 3.4 us; LL: 2.7 us, 0.47 us), AWS p4d
    # (400 Gb/s EFA for 8 GPUs) and A100 NVLink (600 GB/s both directions)
    assert smile.LINKS == dict(lat_slow=9.6e-6, bw_slow=400e9 / 8 / 8, lat_fast=3.4e-6,
                               bw_fast=600e9 / 2, gap_slow=2.7e-6, gap_fast=0.47e-6)


def test_overlapped_smile_never_beats_flat_when_cf_equals_cf1():
    for N in (2, 4, 16):
        for T in (64, 4096, 65536):
            c = smile.alltoall_cost(N, 8, T, 1024, 2, 1.25, 1.25, 1.0)
            assert c["smile_time_overlap"] >= c["flat_time_overlap"]
            assert c["flat_time_overlap"] <= c["flat_time"]


def test_amdahl_required_share_hand_values():
    # f = (1 - 1/2.5) / (1 - 1/s): 0.6 for an infinitely fast All2All, 0.75 for s = 5
    assert smile.amdahl_required_share(1e12) == pytest.approx(0.6)
    assert smile.amdahl_required_share(5.0) == pytest.approx(0.75)
    assert smile.amdahl_required_share(2.0) == math.inf
    assert smile.amdahl_required_share(4.0, target=2.0) == pytest.approx(2 / 3)
    f = smile.amdahl_required_share(3.0)
    assert 1 / ((1 - f) + f / 3.0) == pytest.approx(2.5)


def test_modelled_ratio_grows_with_nodes():
    ratios = [smile.alltoall_cost(N, 8, 512, 1024)["flat_time"]
              / smile.alltoall_cost(N, 8, 512, 1024)["smile_time"] for N in (2, 4, 8, 16, 32)]
    assert all(b > a for a, b in zip(ratios, ratios[1:])) and ratios[0] > 1


def test_message_counts_hand_example():
    # N = 2, M = 2. GPU 0 = (node 0, local 0).
    flat = torch.tensor([[5, 1, 0, 3],    # GPU 0: fast to 1, slow to 3 only (2 is empty)
                         [0, 0, 2, 2],    # GPU 1: slow to 2 and 3
                         [1, 1, 1, 0],    # GPU 2: slow to 0 and 1, nothing fast
                         [0, 0, 4, 9]])   # GPU 3: fast to 2
    m = smile.message_counts(flat, 2, 2, "flat")
    assert m["slow_msgs"] == pytest.approx((1 + 2 + 2 + 0) / 4)
    assert m["slow_tokens"] == pytest.approx((3 + 4 + 2 + 0) / 4)
    assert m["fast_msgs"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert m["fast_tokens"] == pytest.approx((1 + 0 + 0 + 4) / 4)
    inter = torch.tensor([[3, 2], [4, 0], [1, 1], [0, 6]])  # (P, N): own node is not a message
    m = smile.message_counts(inter, 2, 2, "inter")
    assert m["slow_msgs"] == pytest.approx((1 + 0 + 1 + 0) / 4)
    assert m["slow_tokens"] == pytest.approx((2 + 0 + 1 + 0) / 4)
    intra = torch.tensor([[3, 2], [4, 0], [1, 1], [0, 6]])  # (P, M): own GPU is not a message
    m = smile.message_counts(intra, 2, 2, "intra")
    assert m["fast_msgs"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert m["slow_msgs"] == 0


# ---------------------------------------------------------------- tier 2: invariants
def test_route_invariants_random():
    torch.manual_seed(1)
    logits = torch.randn(4, 50, 5)
    valid = torch.rand(4, 50) > 0.3
    r = smile.top1_route(logits, 7, valid=valid)
    per_token = r.dispatch.sum((2, 3))  # (G, S)
    assert set(per_token.unique().tolist()) <= {0.0, 1.0}  # at most one expert, one slot
    assert torch.equal(per_token.bool(), r.keep)
    assert r.dispatch.sum(1).max() <= 1  # every (expert, slot) holds at most one token
    assert (r.dispatch.sum((1, 3)) <= 7).all()  # capacity
    assert not (r.keep & ~valid).any()
    # kept tokens per expert = min(capacity, routed tokens)
    routed = torch.nn.functional.one_hot(r.expert, 5) * valid[..., None]
    assert torch.equal(r.dispatch.sum((1, 3)), routed.sum(1).clamp(max=7).float())


def test_drops_are_first_come():
    logits = torch.zeros(1, 10, 3)
    logits[..., 2] = 1.0
    r = smile.top1_route(logits, 4)
    assert r.keep[0].tolist() == [True] * 4 + [False] * 6
    assert r.loc[0].tolist() == list(range(10))


def test_simulated_all2all_definition_and_involution():
    N, M, C = 2, 3, 2
    comm = smile.SimulatedComm(N, M)
    P = N * M
    buf = torch.randn(P, N, C, 4)
    out = comm.inter(buf)
    for n_dst in range(N):
        for m in range(M):
            for n_src in range(N):
                assert torch.equal(out[n_dst * M + m, n_src], buf[n_src * M + m, n_dst])
    assert torch.equal(comm.inter(out), buf)
    buf2 = torch.randn(P, M, C, 4)
    out2 = comm.intra(buf2)
    for n in range(N):
        for m_dst in range(M):
            for m_src in range(M):
                assert torch.equal(out2[n * M + m_dst, m_src], buf2[n * M + m_src, m_dst])
    assert torch.equal(comm.intra(out2), buf2)
    buf3 = torch.randn(P, P, C, 4)
    assert torch.equal(comm.world(buf3)[4, 1], buf3[1, 4])


def _naive_smile(layer, x, cf1, cf2):
    """Per-token loop: the bi-level routing rule written out, no dispatch tensors."""
    N, M = layer.N, layer.M
    P, T, D = x.shape
    C1 = math.ceil(cf1 * T / N)
    C2 = math.ceil(cf2 * N * C1 / M)
    y = torch.zeros_like(x)
    with torch.no_grad():
        # level 1 on each source GPU; remember (token, g1) in each (destination node) bucket
        arrivals = {g: [] for g in range(P)}  # receiving GPU -> list of (src, t, g1), in order
        for n_src in range(N):  # arrival order at the receiver: by source node, then position
            for m in range(M):
                g = n_src * M + m
                fill = [0] * N
                for t in range(T):
                    p1 = torch.softmax(layer.w_node.weight @ x[g, t], -1)
                    n = int(p1.argmax())
                    if fill[n] < C1:
                        arrivals[n * M + m].append((g, t, p1[n], fill[n], n_src))
                    fill[n] += 1
        for recv, items in arrivals.items():
            items.sort(key=lambda it: (it[4], it[3]))
            fill = [0] * M
            node = recv // M
            for g, t, g1, _, _ in items:
                p2 = torch.softmax(layer.w_gpu.weight @ x[g, t], -1)
                m = int(p2.argmax())
                if fill[m] < C2:
                    e = node * M + m
                    ex = layer.experts
                    h = torch.nn.functional.gelu(x[g, t] @ ex.w1[e] + ex.b1[e])
                    y[g, t] = g1 * p2[m] * (h @ ex.w2[e] + ex.b2[e])
                fill[m] += 1
    return y


def _naive_switch(layer, x, cf):
    P, T, D = x.shape
    C = math.ceil(cf * T / layer.E)
    y = torch.zeros_like(x)
    with torch.no_grad():
        for g in range(P):
            fill = [0] * layer.E
            for t in range(T):
                p = torch.softmax(layer.w_router.weight @ x[g, t], -1)
                e = int(p.argmax())
                if fill[e] < C:
                    ex = layer.experts
                    h = torch.nn.functional.gelu(x[g, t] @ ex.w1[e] + ex.b1[e])
                    y[g, t] = p[e] * (h @ ex.w2[e] + ex.b2[e])
                fill[e] += 1
    return y


def test_smile_layer_matches_per_token_loop_with_drops():
    torch.manual_seed(0)
    # T = 10: C1 = ceil(0.8 * 10 / 2) = 4, C2 = ceil(1.0 * 2 * 4 / 3) = 3 (not ceil(10 / 3) = 4)
    cfg = small_cfg(nodes=2, gpus_per_node=3, cf1=0.8, cf2=1.0)
    layer = smile.SmileMoE(cfg)
    x = torch.randn(6, 10, 8)
    y, lb, stats = layer(x, smile.SimulatedComm(2, 3))
    assert stats["dropped"] > 0  # capacities this small must drop tokens at some level
    want = _naive_smile(layer, x, 0.8, 1.0)
    assert torch.allclose(y, want, atol=1e-6)
    assert ((y.abs().sum(-1) == 0).sum()).item() == stats["dropped"]  # dropped tokens: y = 0


def test_switch_layer_matches_per_token_loop_with_drops():
    torch.manual_seed(0)
    cfg = small_cfg(nodes=2, gpus_per_node=2, cf=0.75)
    layer = smile.SwitchMoE(cfg)
    x = torch.randn(4, 12, 8)
    y, lb, stats = layer(x, smile.SimulatedComm(2, 2))
    assert stats["dropped"] > 0
    assert torch.allclose(y, _naive_switch(layer, x, 0.75), atol=1e-6)


def test_dispatch_then_combine_is_identity_times_gates():
    torch.manual_seed(2)
    cfg = small_cfg(cf1=1.0, cf2=0.7)
    layer = smile.SmileMoE(cfg)
    layer.experts = torch.nn.Identity()
    x = torch.randn(4, 16, 8)
    y, _, _ = layer(x, smile.SimulatedComm(2, 2))
    with torch.no_grad():
        g1 = torch.softmax(layer.w_node(x), -1).amax(-1)
        g2 = torch.softmax(layer.w_gpu(x), -1).amax(-1)
    kept = y.abs().sum(-1) > 0
    assert kept.any() and (~kept).any()
    assert torch.allclose(y[kept], ((g1 * g2)[..., None] * x)[kept], atol=1e-6)
    assert (g1 * g2 <= 1).all() and (g1 * g2 > 0).all()


def test_smile_with_one_node_reduces_to_flat_switch():
    torch.manual_seed(3)
    x = torch.randn(4, 16, 8)
    for no_drop, cf in ((True, 1.0), (False, 1.0), (False, 0.6)):
        s = smile.SmileMoE(small_cfg(nodes=1, gpus_per_node=4, cf1=1.0, cf2=cf))
        w = smile.SwitchMoE(small_cfg(nodes=1, gpus_per_node=4, cf=cf))
        with torch.no_grad():
            w.w_router.weight.copy_(s.w_gpu.weight)
        w.experts.load_state_dict(s.experts.state_dict())
        comm = smile.SimulatedComm(1, 4)
        ys, lbs, sts = s(x, comm, no_drop)
        yw, lbw, stw = w(x, comm, no_drop)
        assert torch.allclose(ys, yw, atol=1e-6)
        assert sts["dropped"] == stw["dropped"]
        # g1 = 1 with a single node, so its LB term is exactly alpha1 (one expert, f = P = 1)
        assert torch.allclose(lbs, lbw + s.alpha1)


def test_smile_lb_is_sum_of_level_terms():
    torch.manual_seed(4)
    x = torch.randn(4, 16, 8)
    comm = smile.SimulatedComm(2, 2)
    base = smile.SmileMoE(small_cfg(alpha1=0.3, alpha2=0.0, cf1=1.0, cf2=1.0))
    _, lb1, _ = base(x, comm)
    with torch.no_grad():
        p1 = torch.softmax(base.w_node(x), -1)
    assert torch.allclose(lb1, smile.load_balancing_loss(p1, p1.argmax(-1), 0.3))
    base.alpha1, base.alpha2 = 0.0, 0.7
    _, lb2, _ = base(x, comm)
    base.alpha1 = 0.3
    _, lb12, _ = base(x, comm)
    assert lb2.abs().sum() > 0
    assert torch.allclose(lb12, lb1 + lb2)


def test_smile_level2_lb_counts_only_tokens_the_gpu_received():
    torch.manual_seed(6)
    N, M, T = 2, 2, 12
    x = torch.randn(N * M, T, 8)
    layer = smile.SmileMoE(small_cfg(alpha1=0.0, alpha2=1.0, cf1=2.0, cf2=2.0))  # no drops
    _, lb, _ = layer(x, smile.SimulatedComm(N, M))
    with torch.no_grad():
        n_star = layer.w_node(x).argmax(-1)  # (P, T)
        want = []
        for recv in range(N * M):
            n, m = divmod(recv, M)
            got = torch.cat([x[n_src * M + m][n_star[n_src * M + m] == n] for n_src in range(N)])
            p2 = torch.softmax(layer.w_gpu(got), -1)  # only real tokens, no padding slots
            f = torch.nn.functional.one_hot(p2.argmax(-1), M).float().mean(0)
            want.append(M * (f * p2.mean(0)).sum())
    assert torch.allclose(lb, torch.stack(want), atol=1e-6)


def test_per_node_router_uses_the_receiving_nodes_router():
    torch.manual_seed(7)
    x = torch.randn(4, 12, 8)
    comm = smile.SimulatedComm(2, 2)
    torch.manual_seed(0)
    shared = smile.SmileMoE(small_cfg())
    torch.manual_seed(0)
    per = smile.SmileMoE(small_cfg(per_node_router=True))
    assert per.w_gpu_nodes.shape == (2, 2, 8)
    assert torch.allclose(shared(x, comm)[0], per(x, comm)[0])  # identical copies at init
    with torch.no_grad():
        per.w_gpu_nodes[1] = -per.w_gpu_nodes[1]  # node 1 now prefers the other GPU
        shared.w_gpu.weight.copy_(per.w_gpu_nodes[0])
    ys, yp = shared(x, comm)[0], per(x, comm)[0]
    # a token's output differs exactly when it went to node 1 (and was not dropped)
    to_node1 = (per.w_node(x).argmax(-1) == 1) & (yp.abs().sum(-1) > 0)
    assert to_node1.any()
    assert torch.allclose(ys[~to_node1 & (ys.abs().sum(-1) > 0)],
                          yp[~to_node1 & (ys.abs().sum(-1) > 0)], atol=1e-6)
    assert not torch.allclose(ys[to_node1], yp[to_node1])


def test_gradients_reach_routers_through_gates_and_lb_only_routers():
    torch.manual_seed(5)
    x = torch.randn(4, 16, 8)
    comm = smile.SimulatedComm(2, 2)
    layer = smile.SmileMoE(small_cfg(alpha1=0.0, alpha2=0.0, cf1=2.0, cf2=2.0))
    y, lb, _ = layer(x, comm)
    (y ** 2).sum().backward()  # a task loss, no LB term
    assert layer.w_node.weight.grad.abs().sum() > 0  # through g1
    assert layer.w_gpu.weight.grad.abs().sum() > 0  # through g2
    layer.zero_grad(set_to_none=True)
    layer.alpha1, layer.alpha2 = 0.01, 0.01
    _, lb, _ = layer(x, comm)
    lb.sum().backward()
    assert layer.w_node.weight.grad.abs().sum() > 0
    assert layer.w_gpu.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None  # the LB loss never touches the experts


# ---------------------------------------------------------------- the additive-router identity
@pytest.mark.exercise(3)
def test_exercise3_additive_logits_hand_value():
    a = torch.tensor([[[1.0, 2.0]]])  # (G=1, S=1, N=2)
    b = torch.tensor([[[10.0, 20.0, 30.0]]])  # (1, 1, M=3)
    out = smile.additive_router_logits(a, b)
    assert out.shape == (1, 1, 6)
    # expert e = n*M + m: (0,0) (0,1) (0,2) (1,0) (1,1) (1,2)
    assert out[0, 0].tolist() == [11.0, 21.0, 31.0, 12.0, 22.0, 32.0]


@pytest.mark.exercise(3)
def test_exercise3_softmax_of_sum_is_product_of_softmaxes():
    # softmax over (n, m) of a_n + b_m = softmax(a)_n * softmax(b)_m
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    joint = smile.additive_router_logits(a, b).softmax(-1)  # (2, 5, 12)
    prod = (a.softmax(-1)[..., :, None] * b.softmax(-1)[..., None, :]).reshape(2, 5, 12)
    assert torch.allclose(joint, prod, atol=1e-6)


@pytest.mark.exercise(3)
def test_exercise3_smile_without_drops_equals_additive_switch():
    """Shared-router SMILE with no drops computes exactly the additive-router Switch layer."""
    torch.manual_seed(8)
    cfg = small_cfg(nodes=2, gpus_per_node=3)
    s = smile.SmileMoE(cfg)
    a = smile.SwitchMoE(cfg, router="additive")
    with torch.no_grad():
        a.w_node.weight.copy_(s.w_node.weight)
        a.w_gpu.weight.copy_(s.w_gpu.weight)
    a.experts.load_state_dict(s.experts.state_dict())
    x = torch.randn(6, 10, 8)
    comm = smile.SimulatedComm(2, 3)
    ys, _, sts = s(x, comm, no_drop=True)
    ya, _, sta = a(x, comm, no_drop=True)
    assert sts["dropped"] == sta["dropped"] == 0
    assert torch.allclose(ys, ya, atol=1e-6)
    assert ys.abs().sum() > 0
    # with the training capacities the two layers drop different tokens, so they may differ
    ys_cf, _, st_cf = s(x, comm)
    assert st_cf["dropped"] >= 0


def test_additive_router_reaches_both_routers_and_flat_lb():
    torch.manual_seed(9)
    layer = smile.SwitchMoE(small_cfg(alpha=0.5), router="additive")
    x = torch.randn(4, 12, 8)
    y, lb, _ = layer(x, smile.SimulatedComm(2, 2))
    with torch.no_grad():
        logits = smile.additive_router_logits(layer.w_node(x), layer.w_gpu(x))
        p = logits.softmax(-1)
    # its balance term is the flat Switch term over all E = N*M experts
    assert torch.allclose(lb, smile.load_balancing_loss(p, p.argmax(-1), 0.5))
    (y.sum() + lb.sum()).backward()
    assert layer.w_node.weight.grad.abs().sum() > 0 and layer.w_gpu.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- paired starts, evaluation
def test_build_model_pairs_the_variants():
    cfg = small_cfg(batch=8, n_layers=2)
    models = {k: smile.build_model(cfg, k) for k in smile.VARIANTS}
    trunk = {n: p for n, p in models["dense"].named_parameters() if ".ffn." not in n}
    for k, m in models.items():
        params = dict(m.named_parameters())
        for n, p in trunk.items():
            assert torch.equal(params[n], p), (k, n)
    for i in range(cfg.n_layers):
        ref = models["smile"].blocks[i].ffn
        for k in ("switch", "additive"):
            f = models[k].blocks[i].ffn
            for name in ("w1", "b1", "w2", "b2"):
                assert torch.equal(getattr(f.experts, name), getattr(ref.experts, name))
        assert torch.equal(models["additive"].blocks[i].ffn.w_node.weight, ref.w_node.weight)
        assert torch.equal(models["additive"].blocks[i].ffn.w_gpu.weight, ref.w_gpu.weight)
        full = models["switch"].blocks[i].ffn.w_router.weight  # (N*M, D)
        want = (ref.w_node.weight[:, None] + ref.w_gpu.weight[None]).reshape(-1, cfg.d_model)
        assert torch.equal(full, want)
        dense = models["dense"].blocks[i].ffn.net
        assert torch.equal(dense[0].weight, ref.experts.w1[0].T)
        assert torch.equal(dense[2].bias, ref.experts.b2[0])
    # the layers differ between blocks (each block gets its own draws)
    assert not torch.equal(models["smile"].blocks[0].ffn.experts.w1,
                           models["smile"].blocks[1].ffn.experts.w1)
    # at step 0, without drops, the three MoE variants compute the same function
    idx = torch.randint(cfg.vocab, (8, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    comm = smile.SimulatedComm(2, 2)
    out = {k: models[k](idx, comm, True)[0] for k in ("switch", "additive", "smile")}
    assert torch.allclose(out["switch"], out["smile"], atol=1e-5)
    assert torch.allclose(out["additive"], out["smile"], atol=1e-5)
    assert not torch.allclose(models["dense"](idx, comm)[0], out["smile"], atol=1e-3)
    # a different seed gives different weights
    other = smile.build_model(dataclasses.replace(cfg, seed=1), "smile")
    w0 = models["smile"].blocks[0].ffn.w_node.weight
    assert not torch.equal(other.blocks[0].ffn.w_node.weight, w0)


def test_evaluate_defaults_to_no_drops():
    cfg = small_cfg(cf1=0.3, cf2=0.3, batch=8)
    model = smile.build_model(cfg, "smile")
    comm = smile.SimulatedComm(2, 2)
    g = torch.Generator().manual_seed(0)
    val = [smile.sample_batch(smile.make_languages(cfg), 8, cfg.seq_len, g)]
    default = smile.evaluate(model, comm, val)
    assert default == smile.evaluate(model, comm, val, no_drop=True)
    assert default != smile.evaluate(model, comm, val, no_drop=False)
    assert model.training  # evaluate puts the model back in training mode


def test_bayes_floor_hand_value():
    # two languages over V = 2: language 0 always continues with 0, language 1 with 1
    tables = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    idx, tgt = torch.tensor([[0, 0]]), torch.tensor([[0, 0]])
    # first prediction: p(0) = 0.5 (either language); then the language is known: p = 1
    assert smile.bayes_floor(tables, [(idx, tgt)]) == pytest.approx(math.log(2) / 2)


def test_steps_to_reach_interpolates():
    steps, val = [0, 10, 20, 30], [4.0, 3.0, 2.0, 1.5]
    assert smile.steps_to_reach(steps, val, 2.5) == pytest.approx(15.0)
    assert smile.steps_to_reach(steps, val, 3.0) == pytest.approx(10.0)
    assert smile.steps_to_reach(steps, val, 5.0) == 0.0
    assert smile.steps_to_reach(steps, val, 1.0) == math.inf


# ---------------------------------------------------------------- tier 3: distributed == single
def _dist_worker(rank, world, N, M, init, out_dir):
    """One gloo rank: the SMILE and Switch layers over real groups; dumps outputs and grads."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    import datetime

    groups = smile.make_bilevel_groups(N, M, datetime.timedelta(seconds=30))
    comm = smile.DistComm(N, M, groups, torch.device("cpu"))
    res = {}
    # the All2All round trip (inter then intra, then their reverses) is the identity
    buf = torch.randn(1, N, 3, 5)
    res["roundtrip_inter"] = torch.equal(comm.inter(comm.inter(buf)), buf)
    buf2 = torch.randn(1, M, 3, 5)
    res["roundtrip_intra"] = torch.equal(comm.intra(comm.intra(buf2)), buf2)
    # All2All autograd: grad of sum(w * A2A(x)) is A2A(w)
    xa = torch.randn(1, N, 2, 3, dtype=torch.double, requires_grad=True)
    w = torch.randn(1, N, 2, 3, dtype=torch.double)
    (comm.inter(xa) * w).sum().backward()
    res["a2a_grad_ok"] = torch.equal(xa.grad, comm.inter(w))
    # bytes per hop: one exchange each, float32 chunks of 3 * 5 numbers (60 bytes)
    comm.reset_stats()
    comm.inter(torch.zeros(1, N, 3, 5))
    comm.intra(torch.zeros(1, M, 3, 5))
    comm.world(torch.zeros(1, N * M, 3, 5))
    res["bytes"] = {h: (s["slow_bytes"], s["fast_bytes"], s["calls"])
                    for h, s in comm.stats.items()}
    for kind in ("smile", "switch"):
        torch.manual_seed(0)
        cfg = small_cfg(nodes=N, gpus_per_node=M, cf=0.75, cf1=0.9, cf2=0.8)
        layer = (smile.SmileMoE if kind == "smile" else smile.SwitchMoE)(cfg)
        x_all = torch.randn(N * M, 12, 8)  # the same tokens on every rank
        w_all = torch.randn(N * M, 12, 8)  # upstream gradient
        layer.experts.localize(rank)
        x = x_all[rank:rank + 1].clone().requires_grad_(True)
        y, lb, stats = layer(x, comm)
        ((y * w_all[rank:rank + 1]).sum() + lb.sum()).backward()
        res[kind] = {"y": y.detach(), "lb": lb.detach(), "x_grad": x.grad,
                     "dropped": stats["dropped"],
                     "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_matches_single_process(tmp_path):
    """gloo, 2 nodes x 2 GPUs: per-rank outputs and all gradients equal the simulation."""
    N, M = 2, 2
    init = f"file://{tmp_path / 'rdzv'}"
    mp.spawn(_dist_worker, args=(N * M, N, M, init, str(tmp_path)), nprocs=N * M, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(N * M)]
    assert all(r["roundtrip_inter"] and r["roundtrip_intra"] and r["a2a_grad_ok"] for r in ranks)
    # the inter hop is slow, the intra hop fast; the world exchange is slow to the other node's
    # M GPUs and fast to the M - 1 others of its own node (60-byte chunks, self excluded)
    for r in ranks:
        assert r["bytes"] == {"inter": ((N - 1) * 60, 0, 1), "intra": (0, (M - 1) * 60, 1),
                              "world": ((N * M - M) * 60, (M - 1) * 60, 1)}
    for kind in ("smile", "switch"):
        torch.manual_seed(0)
        cfg = small_cfg(nodes=N, gpus_per_node=M, cf=0.75, cf1=0.9, cf2=0.8)
        layer = (smile.SmileMoE if kind == "smile" else smile.SwitchMoE)(cfg)
        x_all = torch.randn(N * M, 12, 8).requires_grad_(True)
        w_all = torch.randn(N * M, 12, 8)
        y, lb, stats = layer(x_all, smile.SimulatedComm(N, M))
        ((y * w_all).sum() + lb.sum()).backward()
        assert stats["dropped"] > 0  # the comparison covers drops
        assert sum(r[kind]["dropped"] for r in ranks) == stats["dropped"]
        for r, res in enumerate(ranks):
            got = res[kind]
            assert torch.allclose(got["y"][0], y[r].detach(), atol=1e-6)
            assert torch.allclose(got["lb"], lb[r:r + 1].detach(), atol=1e-7)
            assert torch.allclose(got["x_grad"][0], x_all.grad[r], atol=1e-6)
            for n, p in layer.named_parameters():
                g = got["grads"][n]
                if n.startswith("experts."):  # each rank holds expert `rank` only
                    assert torch.allclose(g[0], p.grad[r], atol=1e-6), n
        for n, p in layer.named_parameters():
            if not n.startswith("experts."):  # replicated routers: grads sum over ranks
                total = sum(res[kind]["grads"][n] for res in ranks)
                assert torch.allclose(total, p.grad, atol=1e-6), n


@pytest.mark.slow
def test_distributed_training_run_and_failed_worker(tmp_path, monkeypatch):
    # (not quick=True: QUICK would override steps)
    cfg = smile.Config(distributed=True, nodes=2, gpus_per_node=2, steps=4, batch=16,
                       variants="switch,smile", val_batches=1, out_dir=str(tmp_path))
    out = smile.train(cfg)
    assert not (tmp_path / "summary.json").exists()  # train() writes nothing; report() does
    m = out["metrics"]
    for k in ("switch", "smile"):
        assert m[f"max_abs_diff_logits_{k}"] < 1e-5 and m[f"max_abs_diff_grads_{k}"] < 1e-5
        assert math.isfinite(m[f"val_{k}"]) and m[f"loss_last_{k}"] < m[f"loss_first_{k}"]
    # SMILE's inter hop carries the slow traffic, Switch's world hop does
    assert m["a2a_ms_world_smile"] == 0 and m["a2a_ms_inter_switch"] == 0
    assert m["slow_bytes_per_step_smile"] > 0 and m["slow_bytes_per_step_switch"] > 0
    smile.report(out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    # a worker that raises stops the whole run with its error, no hang (the spawned workers
    # inherit the variable that makes the no-op test hook raise on rank 1)
    monkeypatch.setenv("SMILE_TEST_FAIL_RANK", "1")
    bad = dataclasses.replace(cfg, nodes=1, gpus_per_node=2, dist_timeout=20,
                              out_dir=str(tmp_path / "bad"))  # 2 processes are enough here
    with pytest.raises(smile.RunError, match="deliberate failure of rank 1"):
        smile.train(bad)


# ---------------------------------------------------------------- tier 4: smoke run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run (train, then report), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("quick")
    out = smile.train(smile.Config(quick=True, out_dir=str(tmp_path)))
    wrote_before_report = (tmp_path / "summary.json").exists()
    summary = smile.report(out)
    return {"results": out, "summary": summary, "path": tmp_path,
            "wrote_before_report": wrote_before_report}


@pytest.mark.slow
def test_quick_train_smoke(quick_run):
    out, tmp_path = quick_run["results"], quick_run["path"]
    assert not quick_run["wrote_before_report"]  # train() writes nothing; report() does
    for k in smile.VARIANTS:
        h = out["history"][k]
        assert all(math.isfinite(v) for v in h["loss"] + h["val"])
        assert h["val"][-1] < h["val"][0] and h["loss"][-1] < h["loss"][0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["folder"] == "smile" and summary["config"]["steps"] == smile.QUICK["steps"]
    for row in summary["headline"]:
        assert {"metric", "higher_is_better", "method", "baseline", "expect"} <= set(row)
        assert row["expect"] in ("better", "level", "report")
    first_better = next(r for r in summary["headline"] if r["expect"] == "better")
    assert first_better["baseline"]["name"] == "Switch"  # never the dense straw man
    assert summary["headline"][0]["expect"] == "level"  # the convergence claim is a control
    assert summary["metrics"]["slow_msgs_real_switch"] > summary["metrics"]["slow_msgs_real_smile"]
    assert (tmp_path / "smile.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_run_arms_record_the_paired_design(quick_run):
    """The arms of summary.json against the design: every arm sees the same batches from the
    same trunk weights for the same steps and lr; each gets its own router and capacity."""
    arms, cfg = quick_run["summary"]["arms"], quick_run["results"]["cfg"]
    assert set(arms) == {"dense", "Switch", "additive Switch", "SMILE"}
    for key in ("data", "first_batch_checksum", "init", "init_checksum", "steps", "lr"):
        assert len({json.dumps(a[key]) for a in arms.values()}) == 1, key  # paired
    assert arms["SMILE"]["data"] == f"shared training stream (batch seed {cfg.seed + 1})"
    assert arms["SMILE"]["steps"] == smile.QUICK["steps"] and arms["SMILE"]["lr"] == cfg.lr
    assert arms["Switch"]["capacity"] == f"cf {cfg.cf}"
    assert arms["additive Switch"]["capacity"] == f"cf {cfg.cf}"
    assert arms["SMILE"]["capacity"] == f"cf1 {cfg.cf1}, cf2 {cfg.cf2}"
    assert arms["SMILE"]["router"].startswith("W_node, then W_gpu")
    assert arms["Switch"]["router"].startswith("full W_r")
    # the recorded first batch is the one the shared stream really starts with
    tables = smile.make_languages(cfg)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x, _ = smile.sample_batch(tables, cfg.batch, cfg.seq_len, g)
    assert arms["SMILE"]["first_batch_checksum"] == smile._checksum([x])


@pytest.mark.slow
def test_modelled_rows_read_the_stated_node_count(quick_run):
    """The 'N=16, M=8' headline rows hold the cost model at N = 16, not another sweep point."""
    rows = {r["metric"]: r for r in quick_run["summary"]["headline"]}
    cfg = quick_run["results"]["cfg"]
    for T in (512, 4096):
        c = smile.alltoall_cost(16, 8, T, smile.SWEEP_D, 2, cfg.cf, cfg.cf1, cfg.cf2)
        for how, suffix in (("sequential", ""), ("pipelined", "_pipelined"),
                            ("overlapped", "_overlap")):
            r = rows[f"modelled All2All ms, {how} msgs (N=16, M=8, T={T})"]
            assert r["expect"] == "report"  # the same on every seed: a property, not evidence
            assert r["method"]["value"] == pytest.approx(1e3 * c[f"smile_time{suffix}"])
            assert r["baseline"]["value"] == pytest.approx(1e3 * c[f"flat_time{suffix}"])
    premise = {p["name"]: p for p in quick_run["summary"]["premise"]}
    c = smile.alltoall_cost(16, 8, 512, smile.SWEEP_D, 2, cfg.cf, cfg.cf1, cfg.cf2)
    share = next(p for name, p in premise.items() if "T=512, sequential" in name)
    assert share["value"] == pytest.approx(120 * smile.LINKS["lat_slow"] / c["flat_time"])


@pytest.mark.slow
def test_level_rows_state_their_margin(quick_run):
    rows = quick_run["summary"]["headline"]
    for r in rows:
        if r["expect"] == "level":
            assert r["margin"] > 0 and r["margin_why"]
    assert rows[0]["margin"] == smile.LOSS_MARGIN and rows[1]["margin"] == smile.STEPS_MARGIN


def test_same_seed_same_numbers(tmp_path):
    cfg = smile.Config(variants="smile", steps=2, batch=16, val_batches=1, out_dir=str(tmp_path))
    a = smile.train(cfg)["history"]["smile"]
    b = smile.train(cfg)["history"]["smile"]
    assert a["loss"] == b["loss"] and a["val"] == b["val"] and a["drop"] == b["drop"]
    other = smile.make_languages(dataclasses.replace(cfg, seed=1))
    assert not torch.equal(other, smile.make_languages(cfg))  # the seed reaches the data


def _fake_tuning_summary(path, seed, steps, curves, floor=1.0):
    m = {"val_curve_steps": steps, "val_floor": floor,
         **{f"val_curve_{k}": v for k, v in curves.items()}}
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"seed": seed, "metrics": m}))


def test_tuning_lengths_choose_each_arms_lowest_mean_and_flag_the_edge(tmp_path):
    """--curves-from: each arm's length is the step with the lowest validation loss averaged
    over the tuning seeds (per arm, not Switch's step for everyone), at_edge when that is the
    grid's last point; the gaps to Switch are paired per seed at the stated steps."""
    steps = [0, 250, 500, 750, 1000, 1250, 1500]
    sw = ([3.0, 2.0, 1.8, 1.7, 1.6, 1.55, 1.5], [3.0, 2.2, 1.9, 1.8, 1.7, 1.65, 1.6])
    sm = ([3.0, 2.1, 1.7, 1.6, 1.65, 1.7, 1.8], [3.0, 2.1, 1.9, 1.75, 1.72, 1.75, 1.8])
    for i, seed in enumerate((100, 101)):
        _fake_tuning_summary(tmp_path / f"seed{seed}", seed, steps,
                             {"switch": sw[i], "smile": sm[i]}, floor=(1.0, 1.2)[i])
    # a run on a shorter grid is skipped
    _fake_tuning_summary(tmp_path / "other", 102, steps[:3], {"switch": sw[0][:3]})
    curves = smile.tuning_curves(tmp_path)
    assert curves["seeds"] == [100, 101] and curves["steps"] == steps
    got = smile.tuning_lengths(curves)
    assert got["arms"]["Switch"]["best_step"] == 1500 and got["arms"]["Switch"]["at_edge"]
    assert got["arms"]["SMILE"]["best_step"] == 750 and not got["arms"]["SMILE"]["at_edge"]
    assert got["arms"]["SMILE"]["best_val"] == pytest.approx(1.675)
    # Switch's mean falls from 1.60 at 1250 to 1.55 at 1500: -0.02 nats per 100 steps
    assert got["arms"]["Switch"]["slope_per_100"] == pytest.approx(-0.02)
    # least-squares line through the mean points of the last 500 steps (1000, 1250, 1500):
    # Switch 1.65, 1.60, 1.55 lies on it; SMILE 1.685, 1.725, 1.80 rises 0.023 per 100 steps with
    # residuals (0.035 / 6) * (1, -2, 1), so one point's noise is 0.035 / sqrt(6)
    assert got["arms"]["Switch"]["fit_slope_per_100"] == pytest.approx(-0.02)
    assert got["arms"]["Switch"]["fit_resid_sd"] == pytest.approx(0.0, abs=1e-9)
    assert got["arms"]["SMILE"]["fit_slope_per_100"] == pytest.approx(0.023)
    assert got["arms"]["SMILE"]["fit_resid_sd"] == pytest.approx(0.035 / math.sqrt(6))
    assert got["arms"]["SMILE"]["last_minus_best"] == pytest.approx(0.125)
    assert got["arms"]["Switch"]["last_minus_best"] == 0.0
    assert got["gaps"]["SMILE - Switch @500"] == [-0.1, 0.0]
    assert got["gaps"]["SMILE - Switch @1500"] == [0.3, 0.2]
    # paired stats: gaps -0.1, 0.0 -> mean -0.05, sd 0.1/sqrt(2), se 0.05, t(1 df) 6.314
    st = got["gap_stats"]["SMILE - Switch @500"]
    assert st["mean"] == pytest.approx(-0.05) and st["behind"] == 0 and st["n"] == 2
    assert st["ci90"] == pytest.approx([-0.05 - 0.3157, -0.05 + 0.3157], abs=1e-4)
    assert got["gap_stats"]["SMILE - Switch @1500"]["behind"] == 2
    # Switch at 500: 1.8 and 1.9 over floors 1.0 and 1.2 -> 0.75 above the floor; -0.05 / 0.75
    assert st["share_of_reducible"] == pytest.approx(-0.05 / 0.75, abs=1e-4)
    # each seed's gap averaged over the last 250 steps of the default run (250, 500) and of the
    # grid (1250, 1500): seed 100 (0.1 - 0.1) / 2 and (0.15 + 0.3) / 2, seed 101 (-0.1 + 0) / 2
    # and (0.1 + 0.2) / 2
    assert got["gaps"]["SMILE - Switch, mean over steps 250-500"] == [0.0, -0.05]
    assert got["gaps"]["SMILE - Switch, mean over steps 1250-1500"] == [0.225, 0.15]
    assert got["gap_stats"]["SMILE - Switch, mean over steps 1250-1500"]["behind"] == 2
    # three seeds: t with 2 df (2.920); 0.1, 0.2, 0.3 -> se 0.1/sqrt(3)
    three = smile.paired_gap_stats([0.1, 0.2, 0.3])
    assert three["ci90"] == pytest.approx([0.2 - 0.1686, 0.2 + 0.1686], abs=1e-4)
    smile.plot_tuning(curves, got, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        smile.main(["--curves-from", str(tmp_path / "nothing"), "--out-dir", str(tmp_path)])
    assert "no summary.json" in str(e.value)


def test_cli_errors_are_one_line(capsys):
    for argv in (["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--variants", "moe"],
                 ["--batch", "30"]):
        with pytest.raises(SystemExit) as e:
            smile.parse_args(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            smile.parse_args(["--device", "cuda"])
        assert "CUDA" in capsys.readouterr().err
    for argv in (["--seed", "-1"], ["--seed", str(2**32)], ["--eval-every", "0"]):
        with pytest.raises(SystemExit):
            smile.parse_args(argv)
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_torchrun_more_processes_than_gpus_is_one_line(capsys, monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as e:
        smile.parse_args(["--distributed", "--device", "cuda"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 processes" in err and "2 GPU" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    cfg = smile.parse_args(["--distributed", "--device", "cuda"])
    assert (cfg.nodes, cfg.gpus_per_node) == (1, 4)


def test_bad_out_dir_fails_before_training(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("")
    with pytest.raises(SystemExit) as e:
        smile.main(["--quick", "--out-dir", str(f / "sub")])
    assert "not a writable folder" in str(e.value)


def _lb_loss_hand_values():
    """Hand values of the load-balancing loss, checked by every exercise-1 test: padding
    excluded, f from the arg-max counts, one loss per device."""
    p = torch.tensor([[[.9, .1], [.8, .2], [.3, .7], [.4, .6]]])
    assert torch.allclose(smile.load_balancing_loss(p, p.argmax(-1), 1.0), torch.tensor([1.0]))
    # a padding slot (last) must not count: f = [2/3, 1/3], P = [2/3, 1/3]
    # -> 2 * (4/9 + 1/9) = 10/9
    valid = torch.tensor([[True, True, True, False]])
    out = smile.load_balancing_loss(p, p.argmax(-1), 1.0, valid=valid)
    assert torch.allclose(out, torch.tensor([10 / 9]))
    # two devices are independent
    p2 = torch.cat([p, torch.tensor([[[1.0, 0.0]] * 4])])
    assert torch.allclose(smile.load_balancing_loss(p2, p2.argmax(-1), 1.0),
                          torch.tensor([1.0, 2.0]))


def _alltoall_cost_hand_example_with_three_capacity_factors():
    """N = 2, M = 2, T = 4, d = 1, 1 byte, cf = 1.5, cf1 = 1.25, cf2 = 2. Flat: S = 6 bytes,
    S/P = 1.5 to each of the 2 GPUs on the other node and to the 1 other GPU on this one. SMILE:
    S1 = 5, S1/N = 2.5 bytes to 1 GPU; S2 = cf2 cf1 T d = 10, S2/M = 5 bytes to 1 GPU."""
    c = smile.alltoall_cost(2, 2, 4, 1, 1, 1.5, 1.25, 2.0)
    assert (c["flat_slow_msgs"], c["flat_slow_bytes"]) == (2, 3.0)
    assert (c["flat_fast_msgs"], c["flat_fast_bytes"]) == (1, 1.5)
    assert (c["smile_slow_msgs"], c["smile_slow_bytes"]) == (1, 2.5)
    assert (c["smile_fast_msgs"], c["smile_fast_bytes"]) == (1, 5.0)
    k = smile.LINKS
    a_s, a_f, g_s = k["lat_slow"], k["lat_fast"], min(k["gap_slow"], k["lat_slow"])
    b_s, b_f = 1 / k["bw_slow"], 1 / k["bw_fast"]
    assert c["flat_time"] == pytest.approx((2 * a_s + 3 * b_s) + (a_f + 1.5 * b_f))
    assert c["flat_time_pipelined"] == pytest.approx(max(a_s + g_s + 3 * b_s, a_f + 1.5 * b_f))
    assert c["flat_time_overlap"] == pytest.approx(max(a_s + 3 * b_s, a_f + 1.5 * b_f))
    for key in ("smile_time", "smile_time_pipelined", "smile_time_overlap"):  # hops in series
        assert c[key] == pytest.approx((a_s + 2.5 * b_s) + (a_f + 5 * b_f))
