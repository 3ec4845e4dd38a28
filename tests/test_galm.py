"""Tests for galm/train.py: hand values, invariants, equivalences, a smoke run."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from galm import train as galm

pytestmark = pytest.mark.galm


# ---------------------------------------------------------------------------------------------
# Fixtures: the quick-config graphs (built once)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qcfg():
    return dataclasses.replace(galm.Config(), **galm.QUICK)


@pytest.fixture(scope="module")
def graphs(qcfg):
    rng = np.random.default_rng(0)
    vocab = galm.build_vocab(qcfg)
    return vocab, galm.make_corpus(qcfg, rng, vocab), galm.make_downstream(qcfg, rng, vocab)


def _edge_set(e):
    return {tuple(x) for x in e.T.tolist()}


# ---------------------------------------------------------------------------------------------
# 1. Hand values: scores, losses, metrics
# ---------------------------------------------------------------------------------------------
def test_distmult_hand_value_symmetry_and_dot_product():
    h_u, h_v, w = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([2.0, 1.0])
    assert galm.distmult_score(h_u, w, h_v).item() == pytest.approx(1 * 2 * 3 + 2 * 1 * -1)
    assert galm.distmult_score(h_v, w, h_u).item() == pytest.approx(4.0)
    assert galm.distmult_score(h_u, torch.ones(2), h_v).item() == pytest.approx(h_u @ h_v)


def test_distmult_broadcasts_over_negatives():
    g = torch.Generator().manual_seed(0)
    h_u, w, h_n = torch.randn(3, 4, generator=g), torch.randn(4, generator=g), torch.randn(
        3, 5, 4, generator=g)
    s = galm.distmult_score(h_u.unsqueeze(1), w, h_n)
    naive = torch.tensor([[float((h_u[b] * w * h_n[b, k]).sum()) for k in range(5)]
                          for b in range(3)])
    assert s.shape == (3, 5)
    torch.testing.assert_close(s, naive)


@pytest.mark.exercise(2)
def test_link_bce_loss_hand_values():
    zero = galm.link_bce_loss(torch.zeros(3), torch.zeros(3, 4))
    assert zero.item() == pytest.approx(math.log(2), abs=1e-6)
    # one positive with score 2, one negative with score -1: 0.5 (log(1+e^-2) + log(1+e^-1))
    v = galm.link_bce_loss(torch.tensor([2.0]), torch.tensor([[-1.0]]))
    assert v.item() == pytest.approx(0.5 * (0.126928 + 0.313262), abs=1e-6)
    # a perfect scorer gets (near) zero loss; a reversed one a large loss
    assert galm.link_bce_loss(torch.full((4,), 30.0), torch.full((4, 3), -30.0)).item() < 1e-9
    assert galm.link_bce_loss(torch.full((4,), -30.0), torch.full((4, 3), 30.0)).item() > 29
    # K = 2 negatives: one mean over all three terms, each negative scored on its own
    v = galm.link_bce_loss(torch.tensor([2.0]), torch.tensor([[-1.0, 1.0]]))
    assert v.item() == pytest.approx((0.126928 + 0.313262 + 1.313262) / 3, abs=1e-6)


@pytest.mark.exercise(2)
def test_link_bce_loss_matches_torch_bce_over_all_scores():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(5, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    logits = torch.cat([pos, neg.reshape(-1)])
    labels = torch.cat([torch.ones(5), torch.zeros(35)])
    ref = F.binary_cross_entropy_with_logits(logits, labels)
    torch.testing.assert_close(galm.link_bce_loss(pos, neg), ref)


def test_contrastive_loss_hand_value_and_library_equivalence():
    v = galm.link_contrastive_loss(torch.tensor([2.0]), torch.tensor([[-1.0, 0.0]]))
    assert v.item() == pytest.approx(math.log(1 + math.exp(-3) + math.exp(-2)), abs=1e-6)
    assert galm.link_contrastive_loss(torch.tensor([40.0]), torch.tensor([[0.0, -5.0]])) < 1e-9
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(6, generator=g), torch.randn(6, 3, generator=g)
    ref = F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(galm.link_contrastive_loss(pos, neg), ref)


def test_mrr_and_hits_hand_values():
    scores = torch.tensor([[0.9, 0.5, 0.7]])
    mrr, hits1 = galm.mrr_and_hits(scores, torch.tensor([1]), k=1)
    assert mrr == pytest.approx(1 / 3) and hits1 == 0.0
    assert galm.mrr_and_hits(scores, torch.tensor([1]), k=3)[1] == 1.0
    assert galm.mrr_and_hits(scores, torch.tensor([0]), k=1) == (pytest.approx(1.0), 1.0)
    # two queries: ranks 1 and 3 -> MRR (1 + 1/3) / 2, Hits@2 = 1/2
    two = torch.tensor([[0.9, 0.5, 0.7], [0.1, 0.2, 0.3]])
    mrr, hits2 = galm.mrr_and_hits(two, torch.tensor([0, 0]), k=2)
    assert mrr == pytest.approx((1 + 1 / 3) / 2) and hits2 == 0.5


def test_mrr_filters_known_positives_and_counts_ties_half():
    scores = torch.tensor([[0.9, 0.5, 0.7]])
    filt = torch.tensor([[True, False, False]])  # item 0 is another true item of this user
    assert galm.mrr_and_hits(scores, torch.tensor([1]), 10, filt)[0] == pytest.approx(1 / 2)
    # a constant scorer does not get rank 1: ties count half -> rank 1 + 0.5 * 2 = 2
    assert galm.mrr_and_hits(torch.zeros(1, 3), torch.tensor([2]), 10)[0] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# 2. The GNN
# ---------------------------------------------------------------------------------------------
def _linear(matrix):
    lin = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(matrix)
    return lin


@pytest.mark.exercise(1)
def test_relation_mean_message_by_hand_on_three_nodes():
    # nodes a=0, b=1, c=2; relation r has edges a->c and b->c; W_r = [[1, 1], [0, 2]]
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0], [5.0, 5.0]])
    W_r = _linear(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
    edges = torch.tensor([[0, 1], [2, 2]])
    m = galm.relation_mean_message(h, edges, W_r)
    # W_r h_a = [3, 4], W_r h_b = [2, -2]; mean = [2.5, 1.0]; a and b receive nothing
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.5, 1.0]]))
    assert torch.isfinite(m).all()
    # neighbour order does not matter
    torch.testing.assert_close(galm.relation_mean_message(h, edges.flip(1), W_r), m)
    _relation_mean_message_applies_W_r_per_message()


@pytest.mark.exercise(1)
def test_relation_mean_message_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(7, 4, generator=g)
    edges = torch.randint(7, (2, 15), generator=g)
    W_r = _linear(torch.randn(4, 4, generator=g))
    out = galm.relation_mean_message(h, edges, W_r)
    for v in range(7):
        srcs = edges[0, edges[1] == v]
        want = W_r(h[srcs]).mean(0) if len(srcs) else torch.zeros(4)
        torch.testing.assert_close(out[v], want)
    # a node without in-edges (node 7) gets 0, not 0 / 0
    h8 = torch.randn(8, 4, generator=g)
    out8 = galm.relation_mean_message(h8, edges, W_r)
    assert torch.isfinite(out8).all() and torch.equal(out8[7], torch.zeros(4))
    _relation_mean_message_applies_W_r_per_message()


def test_rgcn_is_identity_at_init_and_hand_value_after():
    gnn = galm.RGCN(2, ["r", "rev_r"])
    h = torch.tensor([[1.0, 2.0], [3.0, -1.0], [5.0, 5.0]])
    edges = galm.with_reverses({"r": torch.tensor([[0, 1], [2, 2]])})
    torch.testing.assert_close(gnn(h, edges), h)
    with torch.no_grad():
        gnn.W_0.weight.copy_(torch.eye(2) * 0.5)
        gnn.W_r["r"].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))
        gnn.W_r["rev_r"].weight.copy_(torch.eye(2))
    z = gnn(h, edges)
    # a: h + 0.5 h + rev message from c = [1, 2] * 1.5 + [5, 5]
    torch.testing.assert_close(z[0], torch.tensor([6.5, 8.0]))
    # c: h * 1.5 + mean over r of W_r h_a, W_r h_b = [7.5, 7.5] + [2.5, 1.0]
    torch.testing.assert_close(z[2], torch.tensor([10.0, 8.5]))


def test_with_reverses_adds_flipped_edges():
    e = torch.tensor([[0, 1], [2, 3]])
    out = galm.with_reverses({"buys": e})
    assert set(out) == {"buys", "rev_buys"}
    assert torch.equal(out["rev_buys"], torch.tensor([[2, 3], [0, 1]]))


def test_split_target_edges_is_a_disjoint_partition():
    e = torch.stack([torch.arange(20), torch.arange(20) + 100])
    target, rest = galm.split_target_edges(e, 7, torch.Generator().manual_seed(0))
    assert target.shape == (2, 7) and rest.shape == (2, 13)
    assert _edge_set(target).isdisjoint(_edge_set(rest))
    assert _edge_set(target) | _edge_set(rest) == _edge_set(e)


def _spy_on_gnn(monkeypatch):
    seen = []
    original = galm.RGCN.forward

    def spy(self, h, edges):
        seen.append({r: e.clone() for r, e in edges.items()})
        return original(self, h, edges)

    monkeypatch.setattr(galm.RGCN, "forward", spy)
    return seen


@pytest.mark.parametrize("leak", [False, True])
def test_message_passing_never_sees_target_or_test_edges(monkeypatch, graphs, qcfg, leak):
    vocab, _, app = graphs
    seen = _spy_on_gnn(monkeypatch)
    cfg = dataclasses.replace(qcfg, finetune_steps=3, leak_targets=leak)
    lm_state = galm.TextEncoder(len(vocab), cfg).state_dict()
    galm.finetune(lm_state, app, "co", cfg, len(vocab), seed=0)
    train_buys, test_buys = _edge_set(app.edges["buys"]), _edge_set(app.test_edges["buys"])
    val_buys = _edge_set(app.val_edges["buys"])
    # the evaluation at step 0, 3 training steps, the evaluation at the last step
    assert len(seen) == 5
    for step_edges in seen:
        mp = _edge_set(step_edges["buys"])
        rev = {(v, u) for u, v in _edge_set(step_edges["rev_buys"])}
        assert mp == rev and mp.isdisjoint(test_buys | val_buys) and mp <= train_buys
    n_train = len(train_buys)
    training_sizes = [len(_edge_set(s["buys"])) for s in seen[1:-1]]
    if leak:  # the exercise switch really leaks: every training edge passes messages
        assert training_sizes == [n_train] * 3
    else:  # half of the training edges are held back as targets in each step
        assert training_sizes == [n_train - n_train // 2] * 3
    for i in (0, -1):  # at evaluation all training edges pass
        assert len(_edge_set(seen[i]["buys"])) == n_train


def test_graph_lp_step_excludes_exactly_its_targets(monkeypatch, graphs):
    _, corpus, _ = graphs
    seen = _spy_on_gnn(monkeypatch)
    gnn = galm.RGCN(4, galm.message_passing_relations(corpus.schema))
    dec = galm.DistMult(4, list(corpus.schema))
    h = torch.randn(len(corpus.texts), 4)
    gen = torch.Generator().manual_seed(0)
    galm.graph_lp_step(h, gnn, dec, corpus, "click", 10, 2, gen, galm.link_bce_loss)
    gen = torch.Generator().manual_seed(0)
    target, _ = galm.split_target_edges(corpus.edges["click"], 10, gen)
    mp = seen[0]
    assert _edge_set(mp["click"]).isdisjoint(_edge_set(target))
    assert len(_edge_set(mp["click"])) == corpus.edges["click"].shape[1] - 10
    for r in ("made_by", "co_purchase"):  # other relations are not targets: all of them pass
        assert torch.equal(mp[r], corpus.edges[r])


# ---------------------------------------------------------------------------------------------
# 3. Negatives, the LM, MLM masking, the lm_train_nodes trick
# ---------------------------------------------------------------------------------------------
def test_negatives_have_the_tail_node_type(graphs):
    _, corpus, app = graphs
    gen = torch.Generator().manual_seed(0)
    for g in (corpus, app):
        for r, (_, tail) in g.schema.items():
            neg = galm.sample_negatives(g.type_nodes[tail], 50, 6, gen)
            assert neg.shape == (50, 6)
            assert {g.node_type[v] for v in neg.reshape(-1).tolist()} == {tail}, r


def test_pooled_embedding_ignores_padding(qcfg):
    torch.manual_seed(0)
    lm = galm.TextEncoder(20, qcfg, max_len=8)
    short = torch.tensor([[1, 5, 7, 9, 0, 0]])
    longer = torch.tensor([[1, 5, 7, 9, 0, 0, 0, 0]])
    torch.testing.assert_close(lm(short), lm(longer))
    assert not torch.allclose(lm(short), lm(torch.tensor([[1, 5, 7, 0, 0, 0]])))


def test_mask_tokens_bert_80_10_10_and_never_cls_or_pad():
    ids = torch.tensor([[1, 10, 11, 12, 0, 0]] * 4000)
    out, labels = galm.mask_tokens(ids, 0.5, 2, 20, torch.Generator().manual_seed(0))
    target = labels != -100  # (N, T) the selected positions
    assert target[:, [0, 4, 5]].sum() == 0 and torch.equal(out[:, [0, 4, 5]], ids[:, [0, 4, 5]])
    assert torch.equal(labels[target], ids[target])  # every target's label is the original word
    assert 0.47 < target[:, 1:4].float().mean() < 0.53
    # outside the targets nothing changes
    assert torch.equal(out[~target], ids[~target])
    n = target.sum().item()
    masked = (out[target] == 2).sum().item() / n
    kept = (out[target] == ids[target]).sum().item() / n
    swapped = 1 - masked - kept
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1 - 0.1 / 17) < 0.02
    assert abs(swapped - 0.1 * 16 / 17) < 0.02  # a random word may equal the original: 1 in 17
    assert (out >= 0).all() and (out < 20).all()
    assert not (out[target & (out != 2)] < 3).any()  # random words are real words, not specials


@pytest.mark.exercise(3)
def test_embed_with_subset_values_and_gradient_routing(qcfg):  # noqa: F811
    torch.manual_seed(0)
    lm = galm.TextEncoder(20, qcfg)
    texts = torch.randint(3, 20, (9, galm.MAX_LEN))
    subset = torch.tensor([2, 5])
    h = galm.embed_with_subset(lm, texts, subset)
    with torch.no_grad():
        full = lm(texts)
    torch.testing.assert_close(h, full, atol=1e-5, rtol=1e-5)
    assert h.requires_grad
    # gradient through the non-subset rows reaches no LM parameter
    others = torch.tensor([0, 1, 3, 4, 6, 7, 8])
    h[others].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in lm.parameters())
    # through the subset rows it does
    galm.embed_with_subset(lm, texts, subset)[subset].pow(2).sum().backward()
    assert lm.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    _embed_with_subset_runs_only_the_subset_with_grad(qcfg)


# ---------------------------------------------------------------------------------------------
# 4. The graph builders
# ---------------------------------------------------------------------------------------------
def test_corpus_schema_and_sizes(graphs, qcfg):
    _, corpus, _ = graphs
    counts = {t: len(v) for t, v in corpus.type_nodes.items()}
    assert counts == {"product": qcfg.n_products, "brand": qcfg.n_brands,
                      "query": qcfg.n_queries}
    assert set(corpus.edges) == {"click", "made_by", "co_purchase"}
    assert corpus.edges["made_by"].shape[1] == qcfg.n_products
    assert corpus.edges["co_purchase"].shape[1] == qcfg.n_products
    # each query clicks 1..clicks_per_query distinct products (a repeated click is one edge)
    per_query = torch.bincount(corpus.edges["click"][0])[corpus.type_nodes["query"]]
    assert per_query.min() >= 1 and per_query.max() <= qcfg.clicks_per_query
    for r, (head, tail) in corpus.schema.items():
        assert {corpus.node_type[u] for u in corpus.edges[r][0].tolist()} == {head}
        assert {corpus.node_type[v] for v in corpus.edges[r][1].tolist()} == {tail}
    G = corpus.nx_graph
    assert G.number_of_nodes() == len(corpus.texts)
    assert G.number_of_edges() == sum(e.shape[1] for e in corpus.edges.values())
    for u, v, r in G.edges(keys=True):  # clicks and co-purchases stay within a category
        if r in ("click", "co_purchase"):
            assert G.nodes[u]["category"] == G.nodes[v]["category"]


def test_synonyms_never_share_a_text(graphs, qcfg):
    vocab, corpus, app = graphs
    pw = {vocab[f"pw{c}"] for c in range(qcfg.n_categories)}
    qw = {vocab[f"qw{c}"] for c in range(qcfg.n_categories)}
    for g in (corpus, app):
        for row, t in zip(g.texts.tolist(), g.node_type):
            words = set(row)
            assert not (words & pw and words & qw)
            assert bool(words & qw) == (t in ("query", "user"))


def test_downstream_schema_split_and_labels(graphs, qcfg):
    _, corpus, app = graphs
    assert {t: len(v) for t, v in app.type_nodes.items()} == {"item": qcfg.n_items,
                                                             "user": qcfg.n_users}
    assert set(app.type_nodes).isdisjoint(corpus.type_nodes)
    assert set(app.schema).isdisjoint(corpus.schema)
    train, test = _edge_set(app.edges["buys"]), _edge_set(app.test_edges["buys"])
    val = _edge_set(app.val_edges["buys"])
    assert train.isdisjoint(test) and val.isdisjoint(train | test)
    assert (len(train), len(val)) == (qcfg.n_train_edges, qcfg.n_val_edges)
    G = app.nx_graph
    for u, i in train | val | test:  # a user buys only items of exactly its category and material
        assert app.node_type[u] == "user" and app.node_type[i] == "item"
        assert (G.nodes[u]["category"], G.nodes[u]["material"]) == \
            (G.nodes[i]["category"], G.nodes[i]["material"])
    assert set(app.test_edges) == set(app.val_edges) == {"buys"}
    # buys is not a renamed click: the user's colour is unknown, its material decides
    assert all(G.nodes[int(u)]["colour"] == -1 for u in app.type_nodes["user"])
    # node classification: the users split into labelled / validation / test; no item labelled
    lab, val_u, unl = (set(x.tolist()) for x in (app.nc_train, app.nc_val, app.nc_test))
    assert lab.isdisjoint(unl) and val_u.isdisjoint(lab | unl)
    assert lab | val_u | unl == set(app.type_nodes["user"].tolist())
    assert len(lab) == max(1, round(qcfg.nc_user_frac * qcfg.n_users))
    assert len(val_u) == max(1, round(qcfg.nc_val_frac * qcfg.n_users))
    for v in range(len(app.texts)):
        assert app.labels[v] == G.nodes[v]["category"]


def test_graph_builders_are_deterministic_per_seed(qcfg):
    vocab = galm.build_vocab(qcfg)

    def build(seed):
        rng = np.random.default_rng(seed)
        return galm.make_corpus(qcfg, rng, vocab), galm.make_downstream(qcfg, rng, vocab)

    (c0, a0), (c1, a1), (c2, _) = build(0), build(0), build(1)
    assert torch.equal(c0.texts, c1.texts) and torch.equal(a0.texts, a1.texts)
    for r in c0.edges:
        assert torch.equal(c0.edges[r], c1.edges[r])
    assert torch.equal(a0.test_edges["buys"], a1.test_edges["buys"])
    assert torch.equal(a0.val_edges["buys"], a1.val_edges["buys"])
    assert not torch.equal(c0.texts, c2.texts)


# ---------------------------------------------------------------------------------------------
# 5. Schema transfer, frozen / warm-up / co-training parameter updates
# ---------------------------------------------------------------------------------------------
def test_transfer_copies_exactly_the_lm_and_no_corpus_relation(graphs, qcfg):
    vocab, corpus, app = graphs
    torch.manual_seed(1)
    src = galm.TextEncoder(len(vocab), qcfg)
    pre_gnn = galm.RGCN(qcfg.hidden, galm.message_passing_relations(corpus.schema))
    model = galm.LinkModel(galm.TextEncoder(len(vocab), qcfg),
                           galm.RGCN(qcfg.hidden, galm.message_passing_relations(app.schema)),
                           galm.DistMult(qcfg.hidden, ["buys"]))
    copied = galm.transfer_lm(src.state_dict(), model)
    sd = model.state_dict()
    assert set(copied) == {k for k in sd if k.startswith("lm.")}
    for k in copied:
        assert torch.equal(sd[k], src.state_dict()[k[3:]])
    assert not any(r in k for k in sd for r in corpus.schema)
    with pytest.raises(RuntimeError):  # per-relation GNN weights do not fit the new schema
        model.gnn.load_state_dict(pre_gnn.state_dict(), strict=True)


def test_frozen_variant_trains_gnn_and_leaves_lm_untouched(graphs, qcfg):
    vocab, _, app = graphs
    torch.manual_seed(0)
    state = galm.TextEncoder(len(vocab), qcfg).state_dict()
    cfg = dataclasses.replace(qcfg, frozen_steps=3)
    model = galm.finetune(state, app, "frozen_gnn", cfg, len(vocab), seed=0)["model"]
    for k, p in model.lm.state_dict().items():
        assert torch.equal(p, state[k]), k
    assert all(p.grad is None for p in model.lm.parameters())
    assert any(p.abs().sum() > 0 for p in model.gnn.parameters())
    # the co-training variant does change the LM
    model = galm.finetune(state, app, "co", cfg, len(vocab), seed=0)["model"]
    assert any(not torch.equal(p, state[k]) for k, p in model.lm.state_dict().items())


def test_warmup_leaves_lm_untouched_and_cotraining_changes_it(graphs, qcfg):
    vocab, corpus, _ = graphs
    torch.manual_seed(0)
    cfg = dataclasses.replace(qcfg, warmup_steps=2, co_steps=2)
    lm = galm.TextEncoder(len(vocab), cfg)
    gnn = galm.RGCN(cfg.hidden, galm.message_passing_relations(corpus.schema))
    dec = galm.DistMult(cfg.hidden, list(corpus.schema))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    galm.gnn_warmup(lm, gnn, dec, corpus, cfg, gen)
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    assert all(p.grad is None for p in lm.parameters())
    assert any(p.abs().sum() > 0 for p in gnn.parameters())
    galm.co_train(lm, gnn, dec, corpus, cfg, gen)
    assert any(not torch.equal(v, before[k]) for k, v in lm.state_dict().items())


# ---------------------------------------------------------------------------------------------
# 5b. Wiring of pre-training, evaluation and node classification
# ---------------------------------------------------------------------------------------------
def _spy(monkeypatch, name):
    """Record (args, result) of every call to galm.<name> made through the module."""
    calls, original = [], getattr(galm, name)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(galm, name, spy)
    return calls


def _relation_of(graph, target):
    """Which relation's edge list holds every edge of target (2, B)."""
    found = [r for r, e in graph.edges.items() if _edge_set(target) <= _edge_set(e)]
    assert len(found) == 1
    return found[0]


def test_pretrain_galm_negatives_have_the_tail_type_of_each_steps_relation(monkeypatch, graphs,
                                                                         qcfg):
    _, corpus, _ = graphs
    targets = _spy(monkeypatch, "split_target_edges")
    negatives = _spy(monkeypatch, "sample_negatives")
    cfg = dataclasses.replace(qcfg, steps=6, batch_edges=16)
    lm = galm.TextEncoder(int(corpus.texts.max()) + 1, cfg)
    galm.pretrain_galm(lm, galm.DistMult(cfg.hidden, list(corpus.schema)), corpus, cfg,
                       torch.Generator().manual_seed(0))
    assert len(targets) == len(negatives) == 6
    for (_, (target, _)), (_, neg) in zip(targets, negatives):
        r = _relation_of(corpus, target)
        tail = corpus.schema[r][1]
        assert {corpus.node_type[v] for v in neg.reshape(-1).tolist()} == {tail}, r
        assert {corpus.node_type[v] for v in target[1].tolist()} == {tail}
        assert neg.shape == (16, cfg.num_neg)


def test_pretrain_galm_trains_every_corpus_relation(monkeypatch, graphs, qcfg):
    _, corpus, _ = graphs
    targets = _spy(monkeypatch, "split_target_edges")
    cfg = dataclasses.replace(qcfg, steps=6, batch_edges=16)
    dec = galm.DistMult(cfg.hidden, list(corpus.schema))
    lm = galm.TextEncoder(int(corpus.texts.max()) + 1, cfg)
    galm.pretrain_galm(lm, dec, corpus, cfg, torch.Generator().manual_seed(0))
    seen = [_relation_of(corpus, t) for _, (t, _) in targets]
    assert seen == list(corpus.schema) * 2  # cycles click, made_by, co_purchase
    for r in corpus.schema:  # every relation's DistMult vector was trained
        assert not torch.equal(dec.w[r].detach(), torch.ones(cfg.hidden)), r


def test_galm_co_trains_every_relation_and_the_gnn_is_in_the_cotraining_optimiser(
        monkeypatch, graphs, qcfg):
    vocab, corpus, _ = graphs
    cfg = dataclasses.replace(qcfg, warmup_steps=0, co_steps=3, batch_edges=16)
    lm = galm.TextEncoder(len(vocab), cfg)
    gnn = galm.RGCN(cfg.hidden, galm.message_passing_relations(corpus.schema))
    dec = galm.DistMult(cfg.hidden, list(corpus.schema))
    targets = _spy(monkeypatch, "split_target_edges")
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    galm.co_train(lm, gnn, dec, corpus, cfg, torch.Generator().manual_seed(0))
    assert [_relation_of(corpus, t) for _, (t, _) in targets] == list(corpus.schema)
    # zero-initialised GNN weights moved: the GNN is optimised together with the LM
    assert gnn.W_0.weight.abs().sum() > 0
    assert all(W.weight.abs().sum() > 0 for W in gnn.W_r.values())
    assert any(not torch.equal(v, lm_before[k]) for k, v in lm.state_dict().items())
    assert all(not torch.equal(dec.w[r].detach(), torch.ones(cfg.hidden)) for r in dec.w)


def test_finetune_co_optimises_lm_gnn_and_decoder_and_lm_ft_has_no_gnn(graphs, qcfg):
    vocab, _, app = graphs
    cfg = dataclasses.replace(qcfg, finetune_steps=2)
    torch.manual_seed(0)
    state = galm.TextEncoder(len(vocab), cfg).state_dict()
    model = galm.finetune(state, app, "co", cfg, len(vocab), seed=0)["model"]
    assert model.gnn.W_0.weight.abs().sum() > 0
    assert all(W.weight.abs().sum() > 0 for W in model.gnn.W_r.values())
    assert not torch.equal(model.decoder.w["buys"].detach(), torch.ones(cfg.hidden))
    assert galm.finetune(state, app, "lm_ft", cfg, len(vocab), seed=0)["model"].gnn is None


@pytest.mark.parametrize("variant", ["lm_ft", "co"])
def test_finetune_negatives_are_items_never_users(monkeypatch, graphs, qcfg, variant):
    # F2 (no GNN) draws its own negatives; F3 goes through graph_lp_step. Both must corrupt the
    # tail of buys (user -> item) with items: a user as a "negative item" is trivially easy.
    vocab, _, app = graphs
    cfg = dataclasses.replace(qcfg, finetune_steps=3)
    pools, real = [], galm.sample_negatives

    def spy(tail_pool, n, k, gen):
        out = real(tail_pool, n, k, gen)
        pools.append((tail_pool.clone(), out.clone()))
        return out

    monkeypatch.setattr(galm, "sample_negatives", spy)
    torch.manual_seed(0)
    galm.finetune(galm.TextEncoder(len(vocab), cfg).state_dict(), app, variant, cfg, len(vocab),
                  seed=0)
    items = app.type_nodes["item"]
    assert len(pools) == cfg.finetune_steps
    for pool, neg in pools:
        assert torch.equal(pool, items)
        assert set(neg.reshape(-1).tolist()) <= set(items.tolist())


@pytest.mark.parametrize("variant", galm.FINETUNE_MODES)
def test_finetune_starts_from_the_pretrained_lm_it_is_given(graphs, qcfg, variant):
    # A pre-trained LM that no seed can recreate (a fresh init, shifted by 0.37): if finetune
    # forgot to load it, its LM would be finetune's own fresh init and the record would differ.
    vocab, _, app = graphs
    cfg = dataclasses.replace(qcfg, finetune_steps=1)
    torch.manual_seed(123)
    lm = galm.TextEncoder(len(vocab), cfg)
    with torch.no_grad():
        for prm in lm.parameters():
            prm.add_(0.37)
    for seed in (0, 123):  # also the seed that made it
        out = galm.finetune(lm.state_dict(), app, variant, cfg, len(vocab), seed=seed)
        assert out["arm"]["init_fingerprint"] == galm.fingerprint(lm)


class _FixedLM(nn.Module):
    """A stand-in LM that returns fixed embeddings, whatever the texts."""

    def __init__(self, z):
        super().__init__()
        self.z = z

    def forward(self, texts):
        return self.z


def _tiny_app():
    """Items 0-3, users 4-5. User 4 bought items 0 (train) and 1 (test); user 5 bought 3 (test)."""
    G = galm.nx.MultiDiGraph()
    for v in range(6):
        G.add_node(v, ntype="item" if v < 4 else "user", category=v % 2, colour=-1,
                   material=0, text="")
    texts = torch.ones(6, galm.MAX_LEN, dtype=torch.long)
    edges = {"buys": torch.tensor([[4], [0]]), "also_viewed": torch.zeros(2, 0, dtype=torch.long)}
    test = {"buys": torch.tensor([[4, 5], [1, 3]])}
    return galm.Graph(G, texts, ["item"] * 4 + ["user"] * 2,
                      {"item": torch.arange(4), "user": torch.tensor([4, 5])}, edges, test,
                      dict(galm.DOWNSTREAM_SCHEMA), torch.tensor([0, 1, 0, 1, 0, 1]))


def test_evaluate_filters_the_users_other_known_items():
    app = _tiny_app()
    # 1-d embeddings: user 4 scores items 0 > 1 > 2 > 3; user 5 scores 3 highest
    z = torch.tensor([[4.0], [3.0], [2.0], [1.0], [1.0], [-1.0]])
    model = galm.LinkModel(_FixedLM(z), None, galm.DistMult(1, ["buys"]))
    mrr, hits1 = galm.evaluate(model, app, k=1)["test"]
    # user 4 -> item 1: item 0 (its training buy) is filtered, so rank 1, not 2;
    # user 5 -> item 3: scores -4, -3, -2, -1 -> rank 1
    assert mrr == pytest.approx(1.0) and hits1 == 1.0
    # without the filter item 0 would outrank item 1: check that the filter is what made it 1
    unfiltered = galm.mrr_and_hits(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([1]), 1)
    assert unfiltered[0] == pytest.approx(0.5)


def test_evaluate_passes_only_training_edges_through_the_gnn(monkeypatch):
    app = _tiny_app()
    seen = _spy_on_gnn(monkeypatch)
    z = torch.randn(6, 2)
    gnn = galm.RGCN(2, galm.message_passing_relations(app.schema))
    galm.evaluate(galm.LinkModel(_FixedLM(z), gnn, galm.DistMult(2, ["buys"])), app, k=1)
    assert _edge_set(seen[0]["buys"]) == {(4, 0)}


def _worded_app():
    """_tiny_app with words: items 0-3 say 5, 6, 5, 7; users 4 and 5 both say 8."""
    app = _tiny_app()
    app.texts = torch.zeros(6, galm.MAX_LEN, dtype=torch.long)
    app.texts[:, 0] = 1  # [CLS]
    app.texts[:, 1] = torch.tensor([5, 6, 5, 7, 8, 8])
    return app


def test_cooc_table_hand_value():
    app = _worded_app()
    # the only training edge (4, 0) pairs words (8, 5): items 0 and 2 score 1, items 1 and 3 score 0
    # user 4 -> item 1 (item 0 filtered): item 2 above, item 3 ties -> rank 2.5
    # user 5 -> item 3: items 0 and 2 above, item 1 ties -> rank 3.5
    mrr, _ = galm.cooc_mrr(app, k=10)
    assert mrr == pytest.approx((1 / 2.5 + 1 / 3.5) / 2)
    # a given table replaces the training edges: (8, 7) makes item 3 first for user 5
    table = torch.zeros(10, 10)
    table[8, 7] = 1.0
    mrr, _ = galm.cooc_mrr(app, k=10, table=table)
    assert mrr == pytest.approx((1 / 2.5 + 1.0) / 2)  # user 4: item 3 above, item 2 ties


def test_chance_mrr_is_the_mean_harmonic_over_candidates():
    app = _tiny_app()
    # user 4 ranks items 1, 2, 3 (item 0 filtered), user 5 all four
    want = ((1 + 1 / 2 + 1 / 3) / 3 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2
    assert galm.chance_mrr(app) == pytest.approx(want)


def test_category_lookup_reads_only_the_category_word_by_hand():
    app = _tiny_app()
    app.texts = torch.zeros(6, galm.MAX_LEN, dtype=torch.long)
    app.texts[:, 0] = 1
    # category words 8 and 9; word 10 is noise. Labelled: node 0 (8, 10) -> 0, nodes 1 and 3
    # (9, 10) -> 1. Test: node 2 (8) -> 0, right; node 4 (11, 10): no category word seen -> the
    # most common label, 1; node 5 (8, 10) with label 1 -> 0, wrong.
    app.texts[[0, 1, 3, 5], 1:3] = torch.tensor([[8, 10], [9, 10], [9, 10], [8, 10]])
    app.texts[2, 1] = 8
    app.texts[4, 1:3] = torch.tensor([11, 10])
    app.labels = torch.tensor([0, 1, 0, 1, 1, 1])
    app.nc_train, app.nc_test = torch.tensor([0, 1, 3]), torch.tensor([2, 4, 5])
    assert galm.category_lookup_acc(app, torch.tensor([8, 9])) == pytest.approx(2 / 3)
    # reading word 10 too changes the table: it votes [1, 2], so nodes 4 and 5 go to label 1
    assert galm.category_lookup_acc(app, torch.tensor([8, 9, 10])) == pytest.approx(1.0)


def test_corpus_clicks_link_the_test_edges_more_than_random_pairs(graphs, qcfg):
    vocab, corpus, app = graphs
    users, items = app.type_nodes["user"], app.type_nodes["item"]
    pairs = torch.stack([users.repeat_interleave(len(items)), items.repeat(len(users))])
    on_test = galm.click_link_frac(corpus, app, vocab, qcfg.n_categories, app.test_edges["buys"])
    on_all = galm.click_link_frac(corpus, app, vocab, qcfg.n_categories, pairs)
    assert on_test == 1.0 and on_all < 0.5


def test_finetune_reports_the_test_score_of_the_best_validation_step(graphs, qcfg):
    vocab, _, app = graphs
    torch.manual_seed(0)
    state = galm.TextEncoder(len(vocab), qcfg).state_dict()
    cfg = dataclasses.replace(qcfg, finetune_steps=12, eval_every=4, patience=100)
    out = galm.finetune(state, app, "co", cfg, len(vocab), seed=0)
    steps, val, test = zip(*out["curve"])
    assert steps == (0, 4, 8, 12)
    best = int(np.argmax(val))  # the first of equal maxima
    assert out["best_step"] == steps[best] == out["arm"]["steps"]
    assert out["mrr"] == test[best]
    # patience 1: it stops at the first check that does not improve on the best validation MRR
    cfg = dataclasses.replace(cfg, finetune_steps=200, patience=1, finetune_lr=1e-9)
    out = galm.finetune(state, app, "co", cfg, len(vocab), seed=0)
    assert out["curve"][-1][0] - out["best_step"] <= cfg.eval_every
    assert len(out["losses"]) < 200


def test_oracle_mrr_expected_rank_over_random_tie_order():
    app = _tiny_app()
    # attribute "category" = v % 2. User 4 (cat 0) -> item 1 (cat 1): not a match. Others of user 4
    # after filtering item 0: items 1, 2, 3; matching: item 2 -> rank 2 or 3 (item 3 ties).
    # User 5 (cat 1) -> item 3 (cat 1): matching others: item 1 -> rank 1 or 2.
    mrr, hits2 = galm.oracle_mrr(app, ("category",), k=2)
    want = ((1 / 2 + 1 / 3) / 2 + (1 + 1 / 2) / 2) / 2
    assert mrr == pytest.approx(want)
    assert hits2 == pytest.approx((0.5 + 1.0) / 2)


def test_ceiling_bounds_a_perfect_attribute_scorer(graphs, qcfg):
    _, _, app = graphs
    mrr, _ = galm.oracle_mrr(app, ("category", "material"), qcfg.hits_k)
    cat_only, _ = galm.oracle_mrr(app, ("category",), qcfg.hits_k)
    assert 0 < cat_only < mrr <= 1
    # a scorer that knows the attributes, with random tie-breaking, averages to the ceiling
    G, items, test = app.nx_graph, app.type_nodes["item"], app.test_edges["buys"]
    match = torch.tensor([[float((G.nodes[int(u)]["category"], G.nodes[int(u)]["material"])
                                 == (G.nodes[int(i)]["category"], G.nodes[int(i)]["material"]))
                           for i in items] for u in test[0]])
    g = torch.Generator().manual_seed(0)
    sims = [galm.ranking_metrics(match + 1e-3 * torch.rand(match.shape, generator=g), app, 10)[0]
            for _ in range(200)]
    assert np.mean(sims) == pytest.approx(mrr, abs=0.01)


@pytest.mark.parametrize("variant", ["probe", "nc_ft"])
def test_node_classification_trains_the_right_parameters_and_scores_unlabelled_users(
        monkeypatch, graphs, qcfg, variant):
    vocab, _, app = graphs
    cfg = dataclasses.replace(qcfg, nc_steps=3)
    torch.manual_seed(0)
    state = galm.TextEncoder(len(vocab), cfg).state_dict()
    out = galm.node_classification(state, app, variant, cfg, len(vocab), seed=0)
    lm = out["model"]["lm"]
    unchanged = all(torch.equal(v, state[k]) for k, v in lm.state_dict().items())
    assert unchanged == (variant == "probe")
    assert len(out["losses"]) == 3 and 0.0 <= out["acc"] <= 1.0
    # the accuracy is measured on the test users, at the last (here: only) validation check
    assert [c[0] for c in out["curve"]] == [3] and out["best_step"] == 3
    with torch.no_grad():
        pred = out["model"]["head"](lm(app.texts[app.nc_test])).argmax(1)
        pred_val = out["model"]["head"](lm(app.texts[app.nc_val])).argmax(1)
    assert out["acc"] == pytest.approx(float((pred == app.labels[app.nc_test]).float().mean()))
    assert out["curve"][0][1] == pytest.approx(
        float((pred_val == app.labels[app.nc_val]).float().mean()))


def test_node_classification_learns_from_labels_with_a_separable_lm(monkeypatch, graphs, qcfg):
    # an LM that already separates categories (one-hot of the label): the probe must reach 1.0
    vocab, _, app = graphs
    cfg = dataclasses.replace(qcfg, nc_steps=150)
    z = F.one_hot(app.labels, cfg.hidden).float() * 5  # (N, D)

    class Lookup(galm.TextEncoder):
        def forward(self, texts):
            rows = [int((app.texts == t).all(1).nonzero()[0]) for t in texts]
            return z[rows]

    monkeypatch.setattr(galm, "TextEncoder", Lookup)
    out = galm.node_classification(galm.TextEncoder(len(vocab), cfg).state_dict(), app,
                                   "probe", cfg, len(vocab), seed=0, lr=3e-3)
    # it trains on the labelled users only: exactly the test users whose category some labelled
    # user has are right (an unseen category can never be predicted)
    seen = set(app.labels[app.nc_train].tolist())
    coverage = np.mean([int(y) in seen for y in app.labels[app.nc_test]])
    assert out["acc"] == pytest.approx(coverage) and 0 < coverage < 1


# ---------------------------------------------------------------------------------------------
# 6. Smoke run of the whole pipeline
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """One train(--quick) for the smoke and design tests (about 5 s)."""
    return galm.train(galm.Config(quick=True, out_dir=str(tmp_path_factory.mktemp("q") / "a")))


@pytest.mark.slow
def test_quick_run_arms_record_the_papers_design(quick_results):
    arms = quick_results["arms"]
    # Pre-training: the general LM from the random init; GaLM and the MLM control from the general
    # LM; GaLM_co from GaLM. The fingerprints are read off the weights each arm really started from.
    assert {a: arms[a]["init"] for a in ("mlm", "mlm_cont", "galm", "galm_co")} == {
        "mlm": "random", "mlm_cont": "mlm", "galm": "mlm", "galm_co": "galm"}
    for name in ("mlm", "mlm_cont", "galm", "galm_co"):
        arm = arms[name]
        assert arm["init_fingerprint"] == arms[arm["init"]]["fingerprint"], name
        assert arm["fingerprint"] != arm["init_fingerprint"], name  # it trained
    assert arms["mlm_cont"]["steps"] == arms["galm"]["steps"]  # the compute-matched control
    assert arms["galm"]["data"].startswith("corpus edges")
    assert arms["mlm_cont"]["data"].startswith("corpus texts")
    # Fine-tuning: every arm starts from its pre-trained LM and trains what its variant names.
    want = {"frozen_gnn": ["decoder", "gnn"], "lm_ft": ["decoder", "lm"],
            "co": ["decoder", "gnn", "lm"], "probe": ["head"], "nc_ft": ["head", "lm"]}
    for pt in galm.PRETRAIN_MODES:
        for ft in (*galm.FINETUNE_MODES, *galm.NC_MODES):
            arm = arms[f"{pt}/{ft}"]
            assert arm["init"] == pt
            assert arm["init_fingerprint"] == arms[pt]["fingerprint"], (pt, ft)
            assert arm["trains"] == want[ft], (pt, ft)
    # Paired: every pre-training gets the same fine-tuning data and cap; each arm its own rate,
    # the one tuned on seeds 100-102 (read off its optimiser), not one rate for all.
    for ft in (*galm.FINETUNE_MODES, *galm.NC_MODES):
        rec = {(arms[f"{pt}/{ft}"]["data"], arms[f"{pt}/{ft}"]["max_steps"])
               for pt in galm.PRETRAIN_MODES}
        assert len(rec) == 1, ft
        for pt in galm.PRETRAIN_MODES:
            assert arms[f"{pt}/{ft}"]["lr"] == galm.FINETUNE_LR[f"{pt}/{ft}"], (pt, ft)
    assert len({a["lr"] for name, a in arms.items() if "/" in name}) > 1


def test_finetune_lr_flag_overrides_every_arms_tuned_rate():
    cfg = galm.Config(finetune_lr=0.02)
    assert {galm.arm_lr(cfg, a) for a in galm.FINETUNE_LR} == {0.02}
    cfg = galm.Config()  # 0: each arm its own tuned rate
    assert [galm.arm_lr(cfg, a) for a in galm.FINETUNE_LR] == list(galm.FINETUNE_LR.values())
    assert set(galm.FINETUNE_LR) == {f"{pt}/{v}" for pt in galm.PRETRAIN_MODES
                                     for v in (*galm.FINETUNE_MODES, *galm.NC_MODES)}


@pytest.mark.slow
def test_quick_run_schema_decreasing_loss_and_determinism(quick_results, tmp_path):
    out = quick_results
    tmp_path = Path(out["cfg"].out_dir).parent
    assert not (tmp_path / "a").exists()  # train() writes nothing; report() does
    hist, m = out["history"], out["metrics"]
    for name, losses in hist["pretrain"].items():
        assert np.all(np.isfinite(losses)), name
    g = hist["pretrain"]["galm"]
    assert np.mean(g[-5:]) < 0.5 * np.mean(g[:5])
    mlm = hist["pretrain"]["general_mlm"]
    assert np.mean(mlm[-5:]) < np.mean(mlm[:5])
    for name, losses in hist["nc"].items():
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), name
    for name, losses in hist["finetune"].items():
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), name
    assert all(0.0 < v <= 1.0 for k, v in m.items() if k.startswith(("mrr/", "hits")))
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k.startswith("acc/"))
    galm.report(out)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary) == {"folder", "seed", "config", "wall_seconds", "metrics", "headline",
                            "premise", "arms"}
    assert summary["folder"] == "galm" and summary["config"]["steps"] == galm.QUICK["steps"]
    assert len(summary["headline"]) == len(galm.CLAIMS)
    for row, claim in zip(summary["headline"], galm.CLAIMS):
        assert row["higher_is_better"] is True and row["expect"] == claim["expect"]
        assert (row["metric"], row["method"]["name"], row["baseline"]["name"]) == (
            claim["metric"], claim["method"][0], claim["baseline"][0])
        assert row["method"]["value"] == m[claim["method"][1]]
        assert row["baseline"]["value"] == m[claim["baseline"][1]]
    # the index shows the first "better" row: GaLM against the general LM, never a random floor
    first = next(r for r in summary["headline"] if r["expect"] == "better")
    assert (first["method"]["name"], first["baseline"]["name"]) == ("galm", "mlm")
    assert all(r["expect"] == "report" for r in summary["headline"]
               if "random" in (r["method"]["name"], r["baseline"]["name"]))
    assert m["mrr/category_only"] < m["mrr/ceiling"] <= 1.0
    assert (tmp_path / "a" / "galm.png").stat().st_size > 0
    again = galm.train(galm.Config(quick=True, out_dir=str(tmp_path / "b")))["metrics"]
    timing = [k for k in m if k.startswith("seconds/")]  # CPU seconds per phase differ per run
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in m.items() if k not in timing}


# ---------------------------------------------------------------------------------------------
# 7. The command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", str(2**32)], ["--steps", "0"],
                                  ["--nc-user-frac", "1.5"], ["--mlm-prob", "0"],
                                  ["--device", "cuda"], ["--finetune-lr", "-1e-3"]])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        galm.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        galm.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default: 200;" in out and "default: 0.15;" in out


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        galm.main(["--quick", "--out-dir", str(blocker / "sub")])
    assert "not a writable folder" in str(e.value)


def _relation_mean_message_applies_W_r_per_message():
    """W_r is any module (here with a bias and a tanh): the message is W_r of each neighbour,
    then the mean, so W_r after the mean differs; a node without in-edges still gets 0."""
    torch.manual_seed(5)
    W_r = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    h = torch.randn(5, 3)
    edges = torch.tensor([[0, 1, 2, 3], [4, 4, 4, 0]])  # nodes 1, 2, 3 receive nothing
    out = galm.relation_mean_message(h, edges, W_r)
    with torch.no_grad():
        want = torch.zeros(5, 3)
        want[4] = W_r(h[[0, 1, 2]]).mean(0)
        want[0] = W_r(h[3])
    torch.testing.assert_close(out.detach(), want)


def _embed_with_subset_runs_only_the_subset_with_grad(qcfg):  # noqa: F811
    """The trick's point: the LM runs with gradient on the subset's rows only."""
    torch.manual_seed(0)
    lm = galm.TextEncoder(20, qcfg)
    texts = torch.randint(3, 20, (9, galm.MAX_LEN))
    seen, forward = [], lm.forward

    def spy(t, *args, **kw):
        seen.append((torch.is_grad_enabled(), len(t)))
        return forward(t, *args, **kw)

    lm.forward = spy
    galm.embed_with_subset(lm, texts, torch.tensor([2, 5]))
    assert sum(n for grad, n in seen if grad) == 2
