"""Tests for mico/train.py: hand values, invariants, equivalences, smoke run, the effect."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mico import train as mico

pytestmark = pytest.mark.mico

LOG2 = math.log(2.0)


def _cfg(**kw):
    return mico.Config(**kw)


# --------------------------------------------------------------------------- cross-entropy (M2/M3)
def test_cross_entropy_matches_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    log_uniform = torch.log(torch.full((2, 2), 0.5))
    assert mico.cross_entropy_p_q(p, log_uniform).item() == pytest.approx(LOG2, abs=1e-6)
    # p = [.5, .5], q = [.2, .8]: -(.5 log .2 + .5 log .8); swapping p and q would give log 2.
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.2, 0.8]])
    want = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8))
    assert mico.cross_entropy_p_q(p, q.log()).item() == pytest.approx(want, abs=1e-6)
    # the batch mean, not the sum: two rows with CE log 2 and `want` average to their mean
    p2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q2 = torch.tensor([[0.5, 0.5], [0.2, 0.8]]).log()
    assert mico.cross_entropy_p_q(p2, q2).item() == pytest.approx((LOG2 + want) / 2, abs=1e-6)


def test_cross_entropy_is_zero_for_matching_one_hots():
    p = torch.eye(3)
    log_q = F.log_softmax(torch.eye(3) * 60.0, dim=-1)  # one-hot up to e^-60
    assert mico.cross_entropy_p_q(p, log_q).item() == pytest.approx(0.0, abs=1e-12)


def test_cross_entropy_against_a_marginal_is_linear_in_p():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(7, 5, generator=g), -1)
    log_q_psi = F.log_softmax(torch.randn(5, generator=g), -1)
    p_bar = p.mean(0)
    want = -(p_bar * log_q_psi).sum()
    assert mico.cross_entropy_p_q(p, log_q_psi).item() == pytest.approx(want.item(), abs=1e-6)


# --------------------------------------------------------------------------- the objective (M4)
@pytest.mark.exercise(1)
def test_mico_loss_matches_hand_values_on_2x2():
    _mico_loss_hand_values_on_2x2()


@pytest.mark.exercise(1)
@pytest.mark.parametrize("K,lam", [(2, 2.0), (16, 5.0), (4, 0.5)])
def test_mico_loss_uniform_everything_is_one_minus_lambda_log_k(K, lam):
    log_u = torch.full((6, K), -math.log(K))
    loss, h_z_cond, h_z = mico.mico_loss(log_u.exp(), log_u, log_u[0], lam)
    assert h_z_cond.item() == pytest.approx(math.log(K), abs=1e-6)
    assert h_z.item() == pytest.approx(math.log(K), abs=1e-6)
    assert loss.item() == pytest.approx((1 - lam) * math.log(K), abs=1e-5)
    _mico_loss_hand_values_on_2x2()


@pytest.mark.exercise(1)
@pytest.mark.parametrize("K,lam", [(2, 2.0), (16, 5.0)])
def test_mico_loss_perfect_balanced_coassignment_is_minus_lambda_log_k(K, lam):
    z = torch.arange(2 * K) % K  # every cluster used twice
    p = F.one_hot(z, K).float()
    log_q = F.log_softmax(60.0 * p, dim=-1)  # the query predicts its document's cluster
    log_q_psi = torch.full((K,), -math.log(K))
    loss, h_z_cond, h_z = mico.mico_loss(p, log_q, log_q_psi, lam)
    assert h_z_cond.item() == pytest.approx(0.0, abs=1e-6)
    assert h_z.item() == pytest.approx(math.log(K), abs=1e-6)
    assert loss.item() == pytest.approx(-lam * math.log(K), abs=1e-5)
    uniform, _, _ = mico.mico_loss(torch.full((2 * K, K), 1 / K),
                                   torch.full((2 * K, K), -math.log(K)), log_q_psi, lam)
    assert loss.item() < uniform.item()
    _mico_loss_hand_values_on_2x2()


@pytest.mark.exercise(1)
def test_mico_loss_is_invariant_to_relabelling_clusters():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(8, 6, generator=g), -1)
    log_q = F.log_softmax(torch.randn(8, 6, generator=g), -1)
    log_q_psi = F.log_softmax(torch.randn(6, generator=g), -1)
    perm = torch.randperm(6, generator=g)
    a = mico.mico_loss(p, log_q, log_q_psi, 2.0)
    b = mico.mico_loss(p[:, perm], log_q[:, perm], log_q_psi[perm], 2.0)
    for u, v in zip(a, b):
        assert u.item() == pytest.approx(v.item(), abs=1e-6)
    # ...but relabelling only one view changes h_z_cond (the views must agree on labels)
    c = mico.mico_loss(p[:, perm], log_q, log_q_psi, 2.0)
    assert abs(c[1].item() - a[1].item()) > 1e-3
    _mico_loss_hand_values_on_2x2()


# --------------------------------------------------------------------------- the model and steps
def _tiny_model(**kw):
    torch.manual_seed(0)
    cfg = _cfg(K=4, hidden=8, **kw)
    return mico.MICO(12, cfg), cfg


def test_posteriors_are_distributions_and_trunk_is_shared():
    model, _ = _tiny_model()
    x = torch.rand(5, 12)
    for logits in (model.doc_logits(x), model.query_logits(x)):
        assert logits.shape == (5, 4)
        torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(5))
    assert model.query_trunk is model.doc_trunk
    names = {n for n, _ in model.named_parameters()}
    assert "psi" in names and len(model.encoder_parameters()) == len(names) - 1
    sep, _ = _tiny_model(separate_encoders=True)
    assert sep.query_trunk is not sep.doc_trunk


def test_inner_step_fits_the_marginal_and_touches_only_psi():
    model, _ = _tiny_model()
    y = torch.rand(64, 12)
    p = model.doc_logits(y).softmax(-1)  # (B, K), still attached to the encoder
    p_bar = p.detach().mean(0)
    mico.fit_marginal(model.psi, p, lr=0.1, steps=300)
    for prm in model.encoder_parameters():
        assert prm.grad is None
    q_psi = model.psi.detach().softmax(-1)
    torch.testing.assert_close(q_psi, p_bar, atol=1e-3, rtol=0)
    # h_z = CE(p_bar, q_psi) >= H(p_bar), with near equality once fitted
    h_pbar = -(p_bar * p_bar.log()).sum().item()
    h_z = mico.cross_entropy_p_q(p.detach(), F.log_softmax(model.psi.detach(), -1)).item()
    assert h_pbar - 1e-6 <= h_z <= h_pbar + 1e-4


def test_one_inner_step_moves_the_marginal_towards_the_batch_average():
    psi = torch.nn.Parameter(torch.zeros(3))
    p = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])  # p_bar = [.6, .25, .15]
    p_bar = p.mean(0)

    def kl():
        q = psi.detach().softmax(-1)
        return (p_bar * (p_bar / q).log()).sum().item()

    before = kl()
    mico.fit_marginal(psi, p, lr=0.1, steps=1)
    assert kl() < before
    # a fresh Adam's first step is lr * sign(gradient): +0.1 where p_bar > 1/3, -0.1 elsewhere
    torch.testing.assert_close(psi.detach(), torch.tensor([0.1, -0.1, -0.1]), atol=1e-5, rtol=0)


def test_outer_step_updates_encoders_but_not_psi():
    model, cfg = _tiny_model()
    opt = torch.optim.Adam(model.encoder_parameters(), lr=1e-2)
    x, y = torch.rand(16, 12), torch.rand(16, 12)
    # what the inner step alone does to psi, on a copy
    psi_ref = torch.nn.Parameter(model.psi.detach().clone())
    mico.fit_marginal(psi_ref, model.doc_logits(y).softmax(-1), cfg.lr_prior, cfg.steps_prior)
    enc_before = [prm.detach().clone() for prm in model.encoder_parameters()]
    out = mico.train_step(model, opt, x, y, cfg)
    torch.testing.assert_close(model.psi.detach(), psi_ref.detach())
    # the outer loss sends no gradient into psi: its .grad is the inner step's alone
    torch.testing.assert_close(model.psi.grad, psi_ref.grad)
    assert all(not torch.equal(a, b.detach())
               for a, b in zip(enc_before, model.encoder_parameters()))
    assert set(out) == {"loss", "h_z_cond", "h_z", "q_z_loss"}
    assert out["loss"] == pytest.approx(out["h_z_cond"] - cfg.lam * out["h_z"], abs=1e-5)


def test_train_step_posteriors_are_softmaxes_over_clusters_not_the_batch():
    import copy

    model, cfg = _tiny_model()
    before = copy.deepcopy(model)
    opt = torch.optim.Adam(model.encoder_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(5, 12, generator=g), torch.rand(5, 12, generator=g)  # B = 5, K = 4
    out = mico.train_step(model, opt, x, y, cfg)
    with torch.no_grad():
        p = before.doc_logits(y).softmax(-1)  # (B, K): one distribution per document
        q_logits = before.query_logits(x)  # (B, K)
        log_psi = F.log_softmax(model.psi, -1)  # psi after the inner step (the outer leaves it)
        want_hc = mico.cross_entropy_p_q(p, F.log_softmax(q_logits, dim=-1)).item()
        batch_hc = mico.cross_entropy_p_q(p, F.log_softmax(q_logits, dim=0)).item()
        want_hz = mico.cross_entropy_p_q(p, log_psi).item()
        batch_hz = mico.cross_entropy_p_q(before.doc_logits(y).softmax(0), log_psi).item()
    assert abs(want_hc - batch_hc) > 1e-2 and abs(want_hz - batch_hz) > 1e-3  # the test can fail
    assert out["h_z_cond"] == pytest.approx(want_hc, abs=1e-5)
    assert out["h_z"] == pytest.approx(want_hz, abs=1e-5)


def test_gradients_reach_the_right_heads():
    model, cfg = _tiny_model()
    x, y = torch.rand(16, 12), torch.rand(16, 12)
    p = model.doc_logits(y).softmax(-1)
    log_q = F.log_softmax(model.query_logits(x), -1)
    log_q_psi = F.log_softmax(model.psi, -1).detach()
    _, h_z_cond, h_z = mico.mico_loss(p, log_q, log_q_psi, cfg.lam)
    heads = [model.doc_head.weight, model.query_head.weight, model.psi]
    g_hz = torch.autograd.grad(h_z, heads, retain_graph=True, allow_unused=True)
    g_hc = torch.autograd.grad(h_z_cond, heads, allow_unused=True)
    # the entropy term reaches the document head only; the query head learns from H_c alone
    assert g_hz[0] is not None and g_hz[0].abs().sum() > 0
    assert g_hz[1] is None and g_hz[2] is None
    assert g_hc[0].abs().sum() > 0 and g_hc[1].abs().sum() > 0


# --------------------------------------------------------------------------- serving and metrics
def test_assignment_puts_every_document_in_one_cluster():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.5, 0.2]])
    dc = mico.assign_documents(logits)
    np.testing.assert_array_equal(dc, [1, 0, 2, 0])
    assert np.bincount(dc, minlength=3).sum() == 4


def test_routing_is_a_ranking_and_top_m_is_distinct():
    scores = np.random.default_rng(0).random((50, 7))
    routes = mico.route_queries(scores)
    assert routes.shape == (50, 7)
    for r, s in zip(routes, scores):
        assert sorted(r) == list(range(7))
        assert np.all(np.diff(s[r]) <= 0)  # best first
        for m in range(1, 8):
            assert len(set(r[:m])) == m
    np.testing.assert_array_equal(mico.route_queries(np.array([[0.2, 0.9, 0.5]])), [[1, 2, 0]])


@pytest.mark.exercise(2)
def test_curve_matches_hand_values_on_a_tiny_index():
    # 5 docs in clusters [0, 0, 1, 2, 2] -> sizes [2, 1, 2]
    doc_cluster = np.array([0, 0, 1, 2, 2])
    routes = np.array([[1, 0, 2], [2, 1, 0]])
    target = np.array([0, 3])  # query 0 wants cluster 0 (rank 2), query 1 cluster 2 (rank 1)
    c = mico.selective_search_curve(doc_cluster, routes, target, 3)
    np.testing.assert_allclose(c["coverage"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(c["cost"], [(1 + 2) / 2 / 5, (3 + 3) / 2 / 5, 1.0])
    np.testing.assert_allclose(c["latency"], [(1 + 2) / 2 / 5, (2 + 2) / 2 / 5, 0.4])
    _curve_with_an_empty_last_cluster()


def _naive_curve(doc_cluster, routes, target, K):
    D = len(doc_cluster)
    sizes = [int(np.sum(doc_cluster == k)) for k in range(K)]
    cov, cost, lat = np.zeros(K), np.zeros(K), np.zeros(K)
    for m in range(1, K + 1):
        for r, t in zip(routes, target):
            searched = list(r[:m])
            cov[m - 1] += doc_cluster[t] in searched
            cost[m - 1] += sum(sizes[z] for z in searched) / D
            lat[m - 1] += max(sizes[z] for z in searched) / D
    n = len(target)
    return dict(coverage=cov / n, cost=cost / n, latency=lat / n)


@pytest.mark.exercise(2)
def test_vectorised_curve_equals_naive_loop_and_is_monotone():
    rng = np.random.default_rng(3)
    K, D, N = 6, 40, 30
    doc_cluster = rng.integers(0, K, D)
    doc_cluster[0] = 5  # keep at least cluster 5 used; some others may be empty
    routes = mico.route_queries(rng.random((N, K)))
    target = rng.integers(0, D, N)
    got = mico.selective_search_curve(doc_cluster, routes, target, K)
    want = _naive_curve(doc_cluster, routes, target, K)
    for k in ("coverage", "cost", "latency"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-12)
        assert np.all(np.diff(got[k]) >= -1e-12)
    assert got["coverage"][-1] == pytest.approx(1.0)
    assert got["cost"][-1] == pytest.approx(1.0)
    assert np.all(got["coverage"] <= 1.0)
    _curve_with_an_empty_last_cluster()


def test_curve_and_metrics_invariant_to_cluster_relabelling():
    rng = np.random.default_rng(4)
    K = 5
    doc_cluster = rng.integers(0, K, 30)
    routes = mico.route_queries(rng.random((20, K)))
    target = rng.integers(0, 30, 20)
    perm = rng.permutation(K)
    a = mico.selective_search_curve(doc_cluster, routes, target, K)
    b = mico.selective_search_curve(perm[doc_cluster], perm[routes], target, K)
    for k in a:
        np.testing.assert_allclose(a[k], b[k])
    assert mico.balance(doc_cluster, K) == pytest.approx(mico.balance(perm[doc_cluster], K))


def test_random_balanced_partition_gives_coverage_close_to_cost():
    rng = np.random.default_rng(0)
    K, D, N = 8, 800, 4000
    doc_cluster, scores = mico.random_baseline(D, N, K, rng)
    assert np.all(np.bincount(doc_cluster, minlength=K) == D // K)
    c = mico.selective_search_curve(doc_cluster, mico.route_queries(scores),
                                    rng.integers(0, D, N), K)
    np.testing.assert_allclose(c["coverage"], c["cost"], atol=0.03)
    assert mico.curve_auc(c["cost"], c["coverage"]) == pytest.approx(0.5, abs=0.03)


def test_auc_matches_hand_trapezoid_and_sklearn():
    assert mico.curve_auc(np.array([0.5, 1.0]), np.array([0.8, 1.0])) == pytest.approx(
        0.5 * 0.8 / 2 + 0.5 * (0.8 + 1.0) / 2)
    from sklearn.metrics import auc

    rng = np.random.default_rng(5)
    cost = np.sort(rng.random(9))
    cov = np.sort(rng.random(9))
    want = auc(np.concatenate([[0.0], cost]), np.concatenate([[0.0], cov]))
    assert mico.curve_auc(cost, cov) == pytest.approx(want, abs=1e-12)


def test_coverage_at_cost_interpolates():
    cost, cov = np.array([0.5, 1.0]), np.array([0.8, 1.0])
    assert mico.coverage_at_cost(cost, cov, 0.25) == pytest.approx(0.4)
    assert mico.coverage_at_cost(cost, cov, 0.75) == pytest.approx(0.9)
    assert mico.coverage_at_cost(cost, cov, 1.0) == pytest.approx(1.0)


def test_balance_extremes():
    eq = mico.balance(np.arange(12) % 4, 4)
    assert eq["entropy"] == pytest.approx(1.0) and eq["max_over_mean"] == pytest.approx(1.0)
    assert eq["empty"] == 0
    one = mico.balance(np.zeros(12, dtype=int), 4)
    assert one["entropy"] == pytest.approx(0.0) and one["max_over_mean"] == pytest.approx(4.0)
    assert one["empty"] == 3
    mid = mico.balance(np.array([0, 0, 1, 1]), 4)  # two of four clusters: log 2 / log 4
    assert mid["entropy"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- data and baselines
def test_dataset_is_a_real_click_log():
    cfg = _cfg(n_docs=200, n_queries=400, combo=0.0)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    T, S = cfg.n_topics, cfg.n_styles
    n_doc_words = T * cfg.topic_words
    n_style = S * cfg.style_words
    assert d["Cd"].shape == (200, n_doc_words + n_style + T * cfg.synonyms)
    np.testing.assert_array_equal(d["Cd"].sum(1), cfg.doc_topic_len + cfg.doc_style_len)
    assert d["Cd"].shape[1] == n_doc_words + n_style + T * cfg.synonyms  # no aspect words
    assert d["Cd"][:, n_doc_words + n_style:].sum() == 0  # synonyms never in documents
    assert d["Cq"][:, n_doc_words:n_doc_words + n_style].sum() == 0  # no boilerplate in queries
    assert set(d["Cq"].sum(1)) <= {2.0, 3.0, 4.0}
    for i in range(400):  # every query word belongs to its clicked document's topic
        t = d["doc_topic"][d["click"][i]]
        words = np.nonzero(d["Cq"][i])[0]
        topic_word = words < n_doc_words
        assert np.all(words[topic_word] // cfg.topic_words == t)
        assert np.all((words[~topic_word] - n_doc_words - n_style) // cfg.synonyms == t)
    idx = np.concatenate([d["train"], d["val"], d["test"]])
    assert sorted(idx) == list(range(400)) and len(d["test"]) == 80
    np.testing.assert_allclose(np.linalg.norm(d["Xd"], axis=1) ** 2,
                               (d["Cd"] ** 2).sum(1) / d["Cd"].sum(1), rtol=1e-5)


def test_combination_documents_write_each_intent_bit_as_an_xor_of_two_aspects():
    cfg = _cfg(n_docs=400, n_queries=200, combo=0.5)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    T, W, n_bits = cfg.n_topics, cfg.aspect_words, 4
    start = T * (cfg.topic_words + cfg.synonyms) + cfg.n_styles * cfg.style_words
    assert d["Cd"].shape[1] == start + 2 * n_bits * 2 * W
    assert 0.4 < d["is_combo"].mean() < 0.6
    seen_bit_values = {}
    for j in range(400):
        words = np.nonzero(d["Cd"][j])[0]
        intent_words = words[words < T * cfg.topic_words]
        aspects = words[words >= start] - start
        if not d["is_combo"][j]:
            assert len(aspects) == 0
            assert np.all(intent_words // cfg.topic_words == d["doc_topic"][j])
            continue
        assert len(intent_words) == 0
        assert d["Cd"][j, start:].sum() == 2 * n_bits * cfg.aspect_len
        group = aspects // W  # group id = ((side * n_bits) + bit) * 2 + value
        side, bit, value = group // (2 * n_bits), (group // 2) % n_bits, group % 2
        t = 0
        for i in range(n_bits):
            a_i = set(value[(side == 0) & (bit == i)])
            b_i = set(value[(side == 1) & (bit == i)])
            assert len(a_i) == 1 and len(b_i) == 1  # one value per (side, bit)
            t |= (a_i.pop() ^ b_i.pop()) << i
            seen_bit_values.setdefault((i, int(d["doc_topic"][j] >> i & 1)), set()).update(
                int(v) for v in value[(side == 0) & (bit == i)])
        assert t == d["doc_topic"][j]  # intent = a XOR b, bit by bit
    # a single aspect group says nothing: both values of a's bit occur under either intent bit
    assert all(v == {0, 1} for v in seen_bit_values.values())


def test_linear_decodability_separates_the_two_worlds():
    lin = _cfg(n_docs=600, n_queries=100, combo=0.0)
    xor = _cfg(n_docs=600, n_queries=100, combo=1.0)
    d_lin = mico.make_dataset(lin, np.random.default_rng(0))
    d_xor = mico.make_dataset(xor, np.random.default_rng(0))
    assert mico.linear_decodability(d_lin, lin) > 0.95
    assert mico.linear_decodability(d_xor, xor) < 0.2  # chance is 1/16


def test_ridge_solve_matches_a_hand_solution():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    Y = np.array([[1.0], [2.0], [3.0]])
    W = mico.ridge_solve(X, Y, [0.5])[0.5]
    Xb = np.concatenate([X, np.ones((3, 1))], 1)
    want = np.linalg.solve(Xb.T @ Xb + 0.5 * np.eye(3), Xb.T @ Y)
    np.testing.assert_allclose(W, want, atol=1e-10)
    # alpha -> 0 with exact data: the fit is exact
    W0 = mico.ridge_solve(X, Y, [1e-9])[1e-9]
    np.testing.assert_allclose(mico.with_bias(X) @ W0, Y, atol=1e-6)


def test_word_model_keeps_real_profiles_and_predicts_only_unclicked_docs():
    cfg = _cfg(n_docs=300, n_queries=600, kmeans_init=1, lsa_dim=16, combo=0.0)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    ed, eq = mico.lsa_embed(d, cfg)
    prof = mico.click_profile(eq, d["click"], d["train"], 300)
    clicked = np.linalg.norm(prof, axis=1) > 0
    assert 0 < (~clicked).sum() < 300
    out = mico.word_model_profiles(d, eq, [1.0])[1.0]
    np.testing.assert_allclose(out[clicked], prof[clicked])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    # in the linear world the prediction for an unclicked doc points at its own intent's profile
    means = np.stack([prof[clicked & (d["doc_topic"] == t)].mean(0) for t in range(16)])
    nearest = (out[~clicked] @ means.T).argmax(1)
    assert np.mean(nearest == d["doc_topic"][~clicked]) > 0.9
    # test and validation clicks are never read
    d2 = dict(d, click=d["click"].copy())
    held = np.concatenate([d["val"], d["test"]])
    d2["click"][held] = np.random.default_rng(3).integers(0, 300, len(held))
    np.testing.assert_allclose(mico.word_model_profiles(d2, eq, [1.0])[1.0], out)


def test_word_model_rung_is_chosen_on_validation_queries_not_test():
    cfg = _cfg(n_docs=200, n_queries=400, kmeans_init=1, lsa_dim=16, K=8, combo=0.0,
               click_weights="1,4", ridge_alphas="0.1,10")
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    emb = mico.lsa_embed(d, cfg)
    best, aucs, (docs, scores) = mico.select_word_model(d, cfg, emb)
    assert set(aucs) == {(0.1, 1.0), (0.1, 4.0), (10.0, 1.0), (10.0, 4.0)}
    assert aucs[best] == max(aucs.values())
    assert docs.shape == (200,) and scores.shape == (400, 8)
    d2 = dict(d, click=d["click"].copy())
    d2["click"][d["test"]] = np.random.default_rng(1).integers(0, 200, len(d["test"]))
    best2, aucs2, _ = mico.select_word_model(d2, cfg, emb)
    assert best2 == best and aucs2 == pytest.approx(aucs)


def test_click_profile_sums_training_clicks_only_and_normalises():
    eq = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])  # (N=4, E=2)
    click = np.array([0, 0, 2, 1])  # query 3 (not training) clicks doc 1
    prof = mico.click_profile(eq, click, np.array([0, 1, 2]), D=3)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(prof, [[s, s], [0.0, 0.0], [s, s]])  # doc 1: no training click
    # a different test query changes nothing
    eq2 = eq.copy()
    eq2[3] = [-9.0, 2.0]
    np.testing.assert_allclose(mico.click_profile(eq2, click, np.array([0, 1, 2]), D=3), prof)


def test_click_weight_is_chosen_on_validation_queries_not_test():
    cfg = _cfg(n_docs=200, n_queries=400, kmeans_init=1, lsa_dim=16, K=8,
               click_weights="0,1,4")
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    emb = mico.lsa_embed(d, cfg)
    w, aucs = mico.select_click_weight(d, cfg, emb)
    assert set(aucs) == {0.0, 1.0, 4.0} and aucs[w] == max(aucs.values())
    # scramble what the test queries clicked: the choice and its scores must not move
    d2 = dict(d, click=d["click"].copy())
    d2["click"][d["test"]] = np.random.default_rng(1).integers(0, 200, len(d["test"]))
    w2, aucs2 = mico.select_click_weight(d2, cfg, emb)
    assert w2 == w and aucs2 == pytest.approx(aucs)
    # ...while scrambling the validation clicks does move the scores
    d3 = dict(d, click=d["click"].copy())
    d3["click"][d["val"]] = np.random.default_rng(1).integers(0, 200, len(d["val"]))
    assert mico.select_click_weight(d3, cfg, emb)[1] != pytest.approx(aucs)


def test_click_aware_kmeans_reads_the_clicks():
    cfg = _cfg(n_docs=300, n_queries=600, kmeans_init=1, lsa_dim=16)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    emb = mico.lsa_embed(d, cfg)
    text, _ = mico.kmeans_baseline(d, cfg, 0.0, emb)
    # w = 0 reads no clicks: the clustering is the same whatever the log says
    d2 = dict(d, click=np.random.default_rng(5).integers(0, 300, 600))
    np.testing.assert_array_equal(mico.kmeans_baseline(d2, cfg, 0.0, emb)[0], text)
    assert not np.array_equal(mico.kmeans_baseline(d2, cfg, 2.0, emb)[0],
                              mico.kmeans_baseline(d, cfg, 2.0, emb)[0])


def test_skewed_clicks_concentrate_on_a_few_documents():
    cfg = _cfg(n_docs=500, n_queries=4000, click_skew=1.0)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    counts = np.sort(np.bincount(d["click"], minlength=500))[::-1]
    # Zipf(1) over 500 documents: the top document gets 1 / H_500 ~ 15 % of the clicks
    assert counts[0] / 4000 == pytest.approx(1 / sum(1 / r for r in range(1, 501)), abs=0.03)
    assert counts[:10].sum() / 4000 > 0.35
    flat = mico.make_dataset(_cfg(n_docs=500, n_queries=4000), np.random.default_rng(0))
    assert np.bincount(flat["click"], minlength=500).max() / 4000 < 0.01


def test_summary_balance_counts_documents_and_traffic_separately():
    doc_cluster = np.array([0, 0, 0, 1])  # sizes [3, 1]
    target = np.array([3, 3, 3, 0])  # clicks: cluster 1 three times, cluster 0 once
    routes = np.array([[1, 0]] * 3 + [[0, 1]])
    curve = mico.selective_search_curve(doc_cluster, routes, target, 2)
    curve["hit1"] = doc_cluster[target] == routes[:, 0]
    seen = np.array([True, True, True, False])
    m = mico.summarise("x", curve, doc_cluster, target, seen, 2, 0.5)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / LOG2
    assert m["x_balance_entropy"] == pytest.approx(h)
    assert m["x_traffic_entropy"] == pytest.approx(h)
    assert m["x_cov1_clicked"] == 1.0 and m["x_cov1_unclicked"] == 1.0
    even = mico.summarise("x", curve, doc_cluster, np.array([3, 0, 3, 0]), seen, 2, 0.5)
    assert even["x_traffic_entropy"] == pytest.approx(1.0)
    assert even["x_balance_entropy"] == pytest.approx(h)


def test_kmeans_and_oracle_baselines_shapes_and_ceiling():
    cfg = _cfg(n_docs=300, n_queries=300, kmeans_init=1, lsa_dim=16)
    d = mico.make_dataset(cfg, np.random.default_rng(0))
    docs, scores = mico.kmeans_baseline(d, cfg)
    assert docs.shape == (300,) and scores.shape == (300, cfg.K)
    assert docs.min() >= 0 and docs.max() < cfg.K
    o_docs, o_scores = mico.oracle_baseline(d["doc_topic"], d["click"], cfg.K)
    c = mico.selective_search_curve(o_docs, mico.route_queries(o_scores), d["click"], cfg.K)
    assert c["coverage"][0] == 1.0


# --------------------------------------------------------------------------- smoke run and effect
def test_quick_run_smoke(tmp_path):
    r1 = mico.train(_cfg(quick=True, out_dir=str(tmp_path / "a")))
    loss = np.array(r1["history"]["loss"])
    assert np.all(np.isfinite(loss))
    assert loss[-20:].mean() < loss[:20].mean() - 0.05
    assert not (tmp_path / "a").exists()  # train() writes nothing; report() does
    summary = mico.report(r1)
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    assert set(s) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                      "premise", "arms"}
    assert s["folder"] == "mico" and s["config"]["steps"] == mico.QUICK["steps"]
    # the index shows the first "better" row: MICO against the click-aware k-means
    first = next(r for r in s["headline"] if r["expect"] == "better")
    assert first["method"]["name"] == "MICO" and "clicks" in first["baseline"]["name"]
    for row in s["headline"]:
        assert set(row) - {"margin", "margin_why"} == {"metric", "higher_is_better", "expect",
                                                       "method", "baseline"}
        assert row["expect"] in ("better", "level", "report")
        assert np.isfinite(row["method"]["value"]) and np.isfinite(row["baseline"]["value"])
    assert (tmp_path / "a" / "recall_cost.png").exists()
    assert (tmp_path / "a" / "training.png").exists()
    r2 = mico.train(_cfg(quick=True, out_dir=str(tmp_path / "b")))
    assert r1["history"]["loss"] == r2["history"]["loss"]
    assert r1["metrics"] == r2["metrics"]


def test_arms_record_what_each_arm_got_and_the_checkpoint_is_the_chosen_one(tmp_path):
    # The design as data (EXPERIMENTS.md, section 7): MICO trains on the training clicks and the
    # documents' text with the configured lr and lambda, for the step validation AUC chose; each
    # rival's knobs are the ones with the best validation AUC; the text-only floor reads no clicks.
    cfg = _cfg(quick=True, out_dir=str(tmp_path), lr=4e-3)
    res = mico.train(cfg)
    m, arms = res["metrics"], res["arms"]
    assert set(arms) == {"MICO", "k-means + clicks + words", "k-means + clicks (w on val)",
                         "k-means (LSA)"}
    run_cfg = res["cfg"]  # after QUICK
    init = f"N(0, {run_cfg.init_first:g}) trunk, N(0, {run_cfg.init_last:g}) heads"
    assert arms["MICO"] == {"data": "train clicks + doc text", "init": init,
                            "lr": 4e-3, "lam": cfg.lam, "steps": m["best_step"],
                            "chosen_on": "val AUC"}
    assert m["best_step"] in res["history"]["eval_step"]
    assert m["best_val_auc"] == max(res["history"]["val_auc"])
    assert res["history"]["val_auc"][res["history"]["eval_step"].index(m["best_step"])] == (
        m["best_val_auc"])
    # the model the test metrics come from is the chosen checkpoint, not the last step's
    data = mico.make_dataset(res["cfg"], np.random.default_rng(cfg.seed))
    curve, _ = mico.evaluate_mico(res["model"], data, data["val"], cfg.K)
    assert mico.curve_auc(curve["cost"], curve["coverage"]) == pytest.approx(m["best_val_auc"])
    assert arms["k-means + clicks (w on val)"]["w"] == max(res["val_aucs"],
                                                           key=res["val_aucs"].get)
    best_words = max(res["word_aucs"], key=res["word_aucs"].get)
    words = arms["k-means + clicks + words"]
    assert (words["ridge_alpha"], words["w"]) == best_words
    assert m["kmwords_val_auc"] == res["word_aucs"][best_words]
    assert arms["k-means (LSA)"]["data"] == "doc text"
    for arm in arms.values():
        assert {"init"} <= set(arm) and ("steps" in arm or "checkpoint" in arm)


@pytest.mark.slow
def test_mico_beats_kmeans_with_balanced_clusters_in_the_linear_world(tmp_path):
    # the linear world (every document names its intent under heavy boilerplate): MICO far above
    # text-only k-means
    m = mico.train(_cfg(steps=1000, combo=0.0, doc_style_len=20, init_first=1.0,
                        out_dir=str(tmp_path)))["metrics"]
    assert m["MICO_cov1"] > m["kmeans_cov1"] + 0.3
    assert m["MICO_cost1"] <= m["kmeans_cost1"] + 0.02
    assert m["MICO_auc"] > m["kmeans_auc"] + 0.05
    assert m["MICO_balance_empty"] <= 1
    assert m["MICO_balance_entropy"] > 0.95
    # the click-aware k-means reads the log too: far above text-only k-means, and (the mechanism
    # the README reports) blind to documents that no training query clicked, where MICO is not
    assert m["kmclicks_auc"] > m["kmeans_auc"] + 0.05
    assert m["kmclicks_cov1_clicked"] > m["kmclicks_cov1_unclicked"] + 0.1
    assert m["MICO_cov1_unclicked"] > m["kmclicks_cov1_unclicked"] + 0.05


def test_cli_rejects_bad_arguments(capsys):
    for argv in (["--steps", "-3"], ["--device", "tpu"], ["--bogus"], ["--lam", "-1"],
                 ["--seed", "-1"], ["--seed", str(2**32)], ["--click-skew", "-0.5"],
                 ["--click-weights", "1,x"], ["--click-weights", "-1"]):
        with pytest.raises(SystemExit) as e:
            mico.parse_args(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err


def test_bad_out_dir_is_one_line_error_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        mico.main(["--quick", "--out-dir", str(blocker / "sub")])
    assert "error" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        mico.parse_args(["--help"])
    assert "(default: 2000;" in capsys.readouterr().out


def _mico_loss_hand_values_on_2x2():
    """Hand values of the MICO loss on a 2x2 case, checked by the exercise-1 tests too (h_z is
    the cross-entropy of p_bar against q_psi, not the entropy of p_bar; p before q; a minus
    before lambda)."""
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    q = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    q_psi = torch.tensor([0.25, 0.75])
    loss, h_z_cond, h_z = mico.mico_loss(p, q.log(), q_psi.log(), 3.0)
    hc = -((0.9 * math.log(0.7) + 0.1 * math.log(0.3))
           + (0.2 * math.log(0.4) + 0.8 * math.log(0.6))) / 2
    # p_bar = [0.55, 0.45]
    hz = -(0.55 * math.log(0.25) + 0.45 * math.log(0.75))
    assert h_z_cond.item() == pytest.approx(hc, abs=1e-6)
    assert h_z.item() == pytest.approx(hz, abs=1e-6)
    assert loss.item() == pytest.approx(hc - 3.0 * hz, abs=1e-6)


def _curve_with_an_empty_last_cluster():
    """Docs in clusters [0, 0, 1] with K = 3: cluster 2 is empty (size 0, not missing)."""
    c = mico.selective_search_curve(np.array([0, 0, 1]), np.array([[2, 0, 1], [0, 1, 2]]),
                                    np.array([0, 2]), 3)
    np.testing.assert_allclose(c["coverage"], [0.0, 1.0, 1.0])
    np.testing.assert_allclose(c["cost"], [1 / 3, 5 / 6, 1.0])
    np.testing.assert_allclose(c["latency"], [1 / 3, 2 / 3, 2 / 3])
