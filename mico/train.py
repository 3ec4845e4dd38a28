"""MICO: selective search with mutual-information co-training, in miniature.

Citation: Zhanyu Wang, Xiao Zhang, Hyokun Yun, Choon Hui Teo, Trishul Chilimbi. "MICO: Selective
Search with Mutual Information Co-training". COLING 2022, pp. 1179-1192. arXiv:2209.04378.
Official code: github.com/aws/selective-search-with-mutual-information-cotraining.
Implemented: the co-training objective (document cluster posterior P(Z|Y), query routing
posterior Q(Z|X), learned marginal q_psi(Z) fitted in an inner step), hard document assignment,
top-m query routing, and the selective-search metrics (coverage vs search cost, latency cost,
area under the coverage-cost curve), against a ladder of rivals that read the same click log.
The paper body was not readable here: the objective follows the official code, and its numbering
M1-M4 is ours [R] (see the README, "Deviations").

The idea. Selective search splits the document collection into K clusters (shards) and sends each
query to only a few of them, so a search costs a fraction of the collection. The clusters are only
useful if the documents a query wants sit in the clusters the query is sent to. MICO learns both
sides from a click log: a document encoder gives each document a distribution over clusters, a query
encoder gives each query a distribution over clusters, and we maximise the mutual information
between a query and the cluster of the document it clicked. That rewards clusters a query can
predict (co-training of the two views) and clusters of equal size (the entropy term).

Reading map (the paper is section 3; read it first, next to the paper):
    MICO (the two views and the marginal psi)                   section 3, The paper
    train_step -> fit_marginal (inner step, M3) -> mico_loss (M2-M4) -> cross_entropy_p_q
    assign_documents -> route_queries                           serving: index, then route
    selective_search_curve -> curve_auc                         the paper's metrics
    the `Try it` cell                                           runs them on four hand-made pairs
    make_dataset (the click log) and the premise statistics     section 4
    k-means on text, + clicks, + a learned word model; random, oracle      section 5
    train (MICO with checkpoint selection, every rival) -> report          section 6
    A first read may skip Config's knobs (section 2), the baselines' internals (section 5) and the
    Appendix (run plumbing, the same bytes in every folder).

Notation (paper / notes -> code). Equation numbers M1-M4 are the notes' numbering [R]:
    x            query (bag of words)                Xq[i], (V,)
    y            clicked document (bag of words)     Xd[j], (V,)
    P(z|y)       document cluster posterior          p, (B, K)
    Q(z|x)       query routing posterior             q, (B, K)
    q_psi(z)     learned marginal, softmax(psi)      model.psi, (K,)
    p_bar(z)     E_y P(z|y), batch estimate          p.mean(0), (K,)
    H_c          CE(P(Z|Y), Q(Z|X)), bound on H(Z|X) h_z_cond
    H(p_bar,q)   CE(p_bar, q_psi), estimate of H(Z)  h_z
    lambda       entropy weight                      cfg.lam
    m            number of clusters searched         m = 1..K
Dimensions: B batch, V vocabulary, H hidden width, K clusters, D documents, N queries.

What the miniature leaves out: bag-of-words MLP encoders with a shared first layer replace the
shared fine-tuned multilingual BERT; a synthetic click log (latent intents, query-only synonyms,
boilerplate-heavy documents) replaces Amazon's search logs; one click per pair, so impression,
click and purchase coverage coincide; K = 16 clusters instead of 64; no warm-up, no multi-GPU.

Run:   python mico/train.py            (see the README for its CPU time)
Ends:  the premise rows; a table, one row per method (MICO, the rivals, random, oracle), with
       coverage / cost / latency at one cluster, coverage / cost at two, coverage at 1.5/K of the
       documents scanned, the AUC and the balance figures; the coverage split by whether a
       training query clicked the document; one verdict line per headline row; the files written.
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FOLDER = "mico"
# PLUMBING: inside Jupyter, sys.argv holds the kernel's arguments and figures show inline; the
# `Try it` cell runs only there.
IN_NOTEBOOK = "ipykernel" in sys.modules


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields. `range` is the valid
# interval ("[1, inf)": 1 included, no upper end); the Appendix turns a violation into one line.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)",
                                           "range": "[0, 4294967295]"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu only in this folder",
                                                 "choices": ("cpu",)})
    steps: int = field(default=2000, metadata={"help": "outer training steps (paper: 1 epoch)",
                                               "range": "[1, inf)"})
    # --- the synthetic search log
    n_topics: int = field(default=16, metadata={"help": "latent topics (what queries want)",
                                                "range": "[1, inf)"})
    n_styles: int = field(default=4, metadata={"help": "boilerplate styles (irrelevant text)",
                                               "range": "[1, inf)"})
    topic_words: int = field(default=40, metadata={"help": "document-side words per topic",
                                                   "range": "[1, inf)"})
    style_words: int = field(default=60, metadata={"help": "boilerplate words per style",
                                                   "range": "[1, inf)"})
    synonyms: int = field(default=20, metadata={"help": "query-only synonyms per topic",
                                                "range": "[1, inf)"})
    doc_topic_len: int = field(default=10, metadata={"help": "topic tokens per document",
                                                     "range": "[1, inf)"})
    doc_style_len: int = field(default=0, metadata={"help": "boilerplate tokens per document",
                                                     "range": "[0, inf)"})
    p_synonym: float = field(default=0.5, metadata={"help": "prob. a query token is a synonym",
                                                    "range": "[0, 1]"})
    combo: float = field(default=0.8, metadata={
        "help": "share of documents written in combination words: such a document writes each "
                "bit of its intent as the XOR of two aspect bits, so no single word (and no "
                "weighted sum of words) says its intent (0 = every document names its intent)",
        "range": "[0, 1]"})
    aspect_words: int = field(default=2, metadata={"help": "words per aspect group (combo > 0)",
                                                    "range": "[1, inf)"})
    aspect_len: int = field(default=1, metadata={
        "help": "tokens a combination document draws from each of its aspect groups",
        "range": "[1, inf)"})
    click_skew: float = field(default=0.0, metadata={
        "help": "Zipf exponent s of document popularity: a query clicks the document of "
                "popularity rank r with prob. ~ r^-s (0 = every document equally likely)",
        "range": "[0, inf)"})
    n_docs: int = field(default=3000, metadata={"help": "documents D", "range": "[1, inf)"})
    n_queries: int = field(default=6000, metadata={"help": "queries N (one click each)",
                                                   "range": "[1, inf)"})
    test_frac: float = field(default=0.2, metadata={"help": "share of queries held out (unseen)",
                                                    "range": "(0, 1)"})
    val_frac: float = field(default=0.1, metadata={"help": "share of training queries for val",
                                                   "range": "(0, 1)"})
    # --- MICO
    K: int = field(default=16, metadata={"help": "number of clusters (paper script: 64)",
                                         "range": "[2, inf)"})
    hidden: int = field(default=64, metadata={"help": "encoder width H (paper: BERT, 768)",
                                              "range": "[1, inf)"})
    separate_encoders: bool = field(default=False, metadata={
        "help": "give each view its own first layer (default: one shared trunk, as the paper)"})
    batch: int = field(default=256, metadata={"help": "training pairs per step (paper: 64/GPU)",
                                              "range": "[1, inf)"})
    lr: float = field(default=3e-3, metadata={"help": "Adam lr of the encoders (paper: 2e-4)",
                                              "range": "(0, inf)"})
    lam: float = field(default=2.0, metadata={"help": "entropy weight lambda (paper script: 5)",
                                              "range": "[0, inf)"})
    lr_prior: float = field(default=0.1, metadata={"help": "Adam lr of the marginal psi",
                                                   "range": "(0, inf)"})
    steps_prior: int = field(default=1, metadata={"help": "inner steps on psi per batch",
                                                  "range": "[1, inf)"})
    clip: float = field(default=1.0, metadata={"help": "grad-norm clip of the outer step",
                                               "range": "(0, inf)"})
    init_first: float = field(default=0.01, metadata={"help": "std of the first layer's init",
                                                     "range": "(0, inf)"})
    init_last: float = field(default=0.3, metadata={"help": "std of the heads' init",
                                                    "range": "(0, inf)"})
    # --- baselines and logging
    lsa_dim: int = field(default=64, metadata={"help": "LSA dimensions of the k-means baselines",
                                               "range": "[1, inf)"})
    kmeans_init: int = field(default=4, metadata={"help": "k-means restarts", "range": "[1, inf)"})
    click_weights: str = field(default="0.5,1,2,4", metadata={
        "help": "weights w of the clicked queries in the click-aware k-means baseline, "
                "comma-separated; the best on validation queries is used"})
    ridge_alphas: str = field(default="0.1,1,10", metadata={
        "help": "ridge strengths of the learned word model (text -> click profile) of the "
                "k-means + clicks + words rung, comma-separated; chosen on validation queries"})
    log_every: int = field(default=200, metadata={"help": "steps between log lines / val evals",
                                                  "range": "[1, inf)"})


# What --quick changes (it wins over the defaults above).
# A smoke run: the first layer at N(0, 1) leaves the uniform saddle within its 100 steps, which the
# default N(0, 0.01) does only after several hundred (README, "How each method's knobs...").
QUICK = dict(steps=100, n_docs=400, n_queries=800, batch=128, log_every=50, kmeans_init=1,
             ridge_alphas="1", click_weights="1,4", init_first=1.0)


def parse_weights(text: str) -> list[float]:
    """PLUMBING: "0.5,1,2" -> [0.5, 1.0, 2.0] (ValueError on a malformed list)."""
    return [float(w) for w in text.split(",") if w.strip()]


def check_config(cfg: Config) -> str | None:
    """PLUMBING: rules that join two fields (the Appendix checks each field's own range)."""
    n_test = int(round(cfg.test_frac * cfg.n_queries))
    n_val = int(round(cfg.val_frac * (cfg.n_queries - n_test)))
    if min(n_test, n_val, cfg.n_queries - n_test - n_val) < 1:
        return "--n-queries, --test-frac and --val-frac leave an empty train, val or test split"
    n_bits = max(1, (cfg.n_topics - 1).bit_length())
    V = (cfg.n_topics * (cfg.topic_words + cfg.synonyms) + cfg.n_styles * cfg.style_words
         + (4 * n_bits * cfg.aspect_words if cfg.combo > 0 else 0))
    if cfg.lsa_dim > V:
        return f"--lsa-dim ({cfg.lsa_dim}) must not exceed the vocabulary size ({V})"
    try:
        weights = parse_weights(cfg.click_weights)
    except ValueError:
        weights = []
    if not weights or min(weights) < 0:
        return f"--click-weights must be comma-separated numbers >= 0, got {cfg.click_weights!r}"
    try:
        alphas = parse_weights(cfg.ridge_alphas)
    except ValueError:
        alphas = []
    if not alphas or min(alphas) <= 0:
        return f"--ridge-alphas must be comma-separated numbers > 0, got {cfg.ridge_alphas!r}"
    if cfg.K > cfg.n_docs:
        return f"--K ({cfg.K}) must not exceed --n-docs ({cfg.n_docs})"
    return None


# %% 3. The paper: two views, one objective (M1-M4), indexing, routing and the metrics
# PAPER: the method in the order it runs. MICO holds the two views and the marginal; train_step
# is one update (the inner fit of the marginal, then the outer step on the objective); at serving
# time every document is stored in one cluster and every query searches its top-m clusters;
# coverage against the share of documents scanned is the paper's measure of a clustering.
def _linear_head(H: int, K: int, std: float) -> nn.Linear:
    head = nn.Linear(H, K)
    nn.init.normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    return head


class MICO(nn.Module):
    """Document assignment head P(Z|Y), query routing head Q(Z|X), learned marginal psi.

    PAPER [V-code]: the official model shares one fine-tuned BERT between queries and documents and
    puts one linear head per view on its [CLS] vector. DEVIATION: our shared trunk is a bag-of-words
    layer, Linear(V, H) -> ReLU, and each head is Linear(H, K) (no pretrained encoder offline, and
    a bag of words is all the toy log has). `separate_encoders=True` gives each view its own trunk.
    """

    def __init__(self, V: int, cfg: Config):
        super().__init__()
        H, K = cfg.hidden, cfg.K
        self.doc_trunk = nn.Linear(V, H)
        self.query_trunk = nn.Linear(V, H) if cfg.separate_encoders else self.doc_trunk
        trunks = [self.doc_trunk] + ([self.query_trunk] if cfg.separate_encoders else [])
        for lin in trunks:
            # DEVIATION: N(0, init_first) first layer and N(0, 0.3) heads instead of PyTorch's
            # default init. With small logits every posterior is uniform, where the objective has
            # a saddle (zero gradient): in the linear world a first layer at PyTorch's default
            # scale stays there or leaves it too late, and N(0, 1) works (README, exercise 5). In
            # the default combination world large random features make memorising the training
            # clicks easy; init_first was tuned there on seeds 100-102 (0.01 of 0.01-1.0).
            nn.init.normal_(lin.weight, std=cfg.init_first)
            nn.init.zeros_(lin.bias)
        self.doc_head = _linear_head(H, K, cfg.init_last)
        self.query_head = _linear_head(H, K, cfg.init_last)
        # PAPER: the marginal model q_psi(Z) = softmax(psi), an approximation of the cluster-size
        # distribution p_bar(z) = E_y P(z|y).
        # DEVIATION: psi starts at zero (uniform q_psi). The official marginal is an
        # nn.Embedding(1, K) left at PyTorch's default init, so its psi starts at random N(0, 1)
        # values; from zero the first inner step already moves q_psi towards the batch's p_bar.
        self.psi = nn.Parameter(torch.zeros(K))  # (K,)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Everything but psi: the outer optimiser's parameters."""
        return [p for n, p in self.named_parameters() if n != "psi"]

    def doc_logits(self, y: torch.Tensor) -> torch.Tensor:
        """y (B, V) -> logits of P(Z|Y), (B, K)."""
        return self.doc_head(F.relu(self.doc_trunk(y)))  # (B, K)

    def query_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, V) -> logits of Q(Z|X), (B, K)."""
        return self.query_head(F.relu(self.query_trunk(x)))  # (B, K)


def train_step(model: MICO, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               cfg: Config) -> dict:
    """One MICO update on a batch of clicked pairs: the inner marginal fit, then the outer step.

    Args: model; opt, the outer optimiser over model.encoder_parameters(); x (B, V) queries;
    y (B, V) their clicked documents; cfg (lam, lr_prior, steps_prior, clip).
    Returns floats: loss, h_z_cond, h_z (after the inner step) and q_z_loss (before it).
    """
    p = model.doc_logits(y).softmax(-1)  # (B, K) = P(Z|y)
    # PAPER [V-code]: 1) inner step: fit q_psi to this batch's p_bar (p is detached inside).
    q_z_loss = fit_marginal(model.psi, p, cfg.lr_prior, cfg.steps_prior)
    # PAPER [V-code]: 2) outer step on the encoders, against the refreshed marginal. Both
    # posteriors are softmaxes over the K clusters (dim=-1), one distribution per row.
    log_q = F.log_softmax(model.query_logits(x), dim=-1)  # (B, K) = log Q(Z|x)
    # DEVIATION: psi is detached here and left out of the outer optimiser. The official code picks
    # the outer parameters by "'q_z' in name", which also matches psi, and it does not zero psi's
    # gradient between the two steps: its outer Adam step moves psi along the sum of the inner
    # step's leftover gradient (towards p_bar) and the outer loss's gradient (-lambda * dh_z/dpsi,
    # towards *raising* h_z). Here only the inner step moves psi.
    log_q_psi = F.log_softmax(model.psi, dim=-1).detach()  # (K,)
    loss, h_z_cond, h_z = mico_loss(p, log_q, log_q_psi, cfg.lam)
    opt.zero_grad()
    loss.backward()
    # PAPER [V-code]: clip the gradient norm at `clip` (1.0).
    # DEVIATION: one joint clip over all encoder parameters. The official code clips two groups
    # separately (the MICO heads with psi, and BERT), each to norm `clip`; our trunk is a single
    # bag-of-words layer, not a pretrained network that needs its own clip and learning rate.
    torch.nn.utils.clip_grad_norm_(model.encoder_parameters(), cfg.clip)
    opt.step()
    return dict(loss=loss.item(), h_z_cond=h_z_cond.item(), h_z=h_z.item(), q_z_loss=q_z_loss)


def fit_marginal(psi: nn.Parameter, p: torch.Tensor, lr: float, steps: int,
                 clip: float = 1.0) -> float:
    """Inner step: fit q_psi = softmax(psi) to the batch's cluster distribution p_bar.

    Args: psi (K,) parameter, changed in place; p (B, K) document posteriors (detached here, so
    fitting the marginal never moves the encoders); lr, steps: Adam settings; clip: grad-norm clip.
    Returns the last CE(p_bar, q_psi) before its step, a float.
    """
    p = p.detach()  # (B, K)
    # PAPER [V-code]: a fresh Adam for psi on every batch (the official code does the same, so no
    # optimiser state is carried from batch to batch).
    opt = torch.optim.Adam([psi], lr=lr)
    for _ in range(steps):
        # DEVIATION: the official code calls backward() again on the first inner loss when
        # num_steps_prior > 1 (a stale gradient); we recompute the loss at every inner step.
        # Eq. (M3): min_psi CE(p_bar, q_psi), whose minimum is q_psi = p_bar
        q_z_loss = cross_entropy_p_q(p, F.log_softmax(psi, dim=-1))
        opt.zero_grad()
        q_z_loss.backward()
        torch.nn.utils.clip_grad_norm_([psi], clip)
        opt.step()
    return float(q_z_loss.detach())


def mico_loss(p: torch.Tensor, log_q: torch.Tensor, log_q_psi: torch.Tensor, lam: float):
    """The MICO objective on a batch of clicked (query, document) pairs.

    Args: p (B, K) = P(Z|y_b) of the clicked documents; log_q (B, K) = log Q(Z|x_b) of their
    queries; log_q_psi (K,) = log softmax(psi), the learned marginal; lam = lambda.
    Returns (loss, h_z_cond, h_z), each a scalar tensor.
    """
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: compute h_z_cond (Eq. M2), h_z (Eq. M3) and the loss of Eq. (M4).
    # PAPER: we want the mutual information between a query X and the cluster Z of the document it
    # clicked, Z ~ P(Z|Y):  (M1) I(X; Z) = H(Z) - H(Z|X).
    # H(Z|X) is bounded above by the cross-entropy between the document's cluster posterior and the
    # query's routing posterior; it is tight when Q(z|x) = E[P(z|Y) | X = x], so minimising it
    # teaches the router where a query's clicked documents live, and pulls each document towards
    # clusters its queries can predict (the two views teach each other: co-training).
    # Eq. (M2) [R: numbering ours]: H(Z|X) <= H_c = E_(x,y) [ - sum_z P(z|y) log Q(z|x) ]
    h_z_cond = cross_entropy_p_q(p, log_q)
    # PAPER: H(Z) = H(p_bar) with p_bar(z) = E_y P(z|y). We estimate it by the cross-entropy of the
    # batch's p_bar against the learned marginal q_psi (>= H(p_bar), equal when q_psi = p_bar; the
    # inner step keeps them close). By linearity the batch mean of -sum_z P(z|y_b) log q_psi(z)
    # is exactly -sum_z p_bar_batch(z) log q_psi(z), which is what the official code computes.
    # Eq. (M3) [R: numbering ours]: H(Z) ~ H(p_bar, q_psi) = - sum_z p_bar(z) log q_psi(z)
    h_z = cross_entropy_p_q(p, log_q_psi)
    # PAPER: H(Z) is largest for equal-sized clusters, so lambda > 1 over-weights it and acts as
    # the cluster-balance regulariser (balanced shards = predictable search cost and latency).
    # Eq. (M4) [R: numbering ours]: loss = H_c - lambda * H(p_bar, q_psi)   (lambda = 1: -I(X; Z))
    loss = h_z_cond - lam * h_z
    # END SOLUTION
    return loss, h_z_cond, h_z


def cross_entropy_p_q(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy CE(p, q) = mean_b ( - sum_z p[b, z] log q[b, z] ).

    Args: p (B, K) rows are distributions; log_q (B, K) or (K,) (broadcast to every row) are log
    probabilities. Returns a scalar tensor. We take log-probabilities (log_softmax of logits)
    instead of probabilities plus an epsilon inside the log: no bias, and no log(0).
    """
    # PAPER: CE(p, q) = E_b [ - sum_z p_b(z) log q_b(z) ]
    return -(p * log_q).sum(-1).mean()


def assign_documents(doc_logits: torch.Tensor) -> np.ndarray:
    """PAPER [V-code]: offline indexing: each document goes to its most likely cluster,
    argmax_z P(z|y).

    Args: doc_logits (D, K). Returns doc_cluster (D,) int.
    """
    return doc_logits.argmax(-1).cpu().numpy()  # (D,)


def route_queries(query_scores: np.ndarray) -> np.ndarray:
    """PAPER [V-code]: online routing: rank the K clusters of each query by score, best first.

    Args: query_scores (N, K), e.g. Q(z|x) or minus the distance to a centroid.
    Returns routes (N, K) int: routes[i, :m] are the m clusters query i searches.
    """
    # PLUMBING: a stable sort, so ties break towards the lower cluster id (reproducible).
    return np.argsort(-query_scores, axis=1, kind="stable")  # (N, K)


def selective_search_curve(doc_cluster: np.ndarray, routes: np.ndarray, target_doc: np.ndarray,
                           K: int) -> dict:
    """PAPER [V-code]: coverage, search cost and latency when a query searches its top-m clusters.

    Args: doc_cluster (D,) cluster of each document; routes (N, K) cluster ranking of each test
    query; target_doc (N,) the document each query clicked; K clusters.
    Returns a dict of numpy arrays indexed by m - 1 (m = 1..K):
      coverage (K,): share of (query, clicked doc) pairs whose document is in the searched clusters;
      cost (K,):     mean share of all documents scanned (sum of the searched clusters' sizes / D);
      latency (K,):  mean size of the largest searched cluster / D (shards run in parallel).
    """
    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: compute coverage@m, cost@m and latency@m for m = 1..K, vectorised over queries.
    D = len(doc_cluster)
    sizes = np.bincount(doc_cluster, minlength=K)  # (K,)
    routed_sizes = sizes[routes]  # (N, K): size of each query's m-th cluster
    # PAPER [V-code]: total search cost@m = mean_x sum_{z in top-m(x)} |cluster z| (here / D)
    cost = np.cumsum(routed_sizes, axis=1).mean(0) / D  # (K,)
    # PAPER [V-code]: latency cost@m = mean_x max_{z in top-m(x)} |cluster z| (here / D)
    latency = np.maximum.accumulate(routed_sizes, axis=1).mean(0) / D  # (K,)
    # PAPER [V-code]: coverage@m = share of pairs whose document's cluster is in the top-m
    rank_of_target = (routes == doc_cluster[target_doc][:, None]).argmax(1)  # (N,) 0-based rank
    coverage = (rank_of_target[:, None] < np.arange(1, K + 1)[None, :]).mean(0)  # (K,)
    # END SOLUTION
    return dict(coverage=coverage, cost=cost, latency=latency)


def curve_auc(cost: np.ndarray, coverage: np.ndarray) -> float:
    """Area under the coverage-vs-cost curve, with (0, 0) prepended (trapezoid rule).

    Args: cost (K,) and coverage (K,), both non-decreasing in m. Returns a float in [0, 1];
    a random partition gives about 0.5, a perfect one (coverage 1 at almost no cost) about 1.
    """
    # PAPER [V-code]: the official model-selection metric, sklearn.metrics.auc on these points.
    x = np.concatenate([[0.0], cost])  # (K+1,)
    y = np.concatenate([[0.0], coverage])  # (K+1,)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


# %% Try it: the objective on four hand-made pairs, one update, and a curve (only in a notebook)
if IN_NOTEBOOK:
    K_try = 2
    p_try = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8]])  # (4, 2) P(z|y)
    agree = torch.tensor([[0.85, 0.15], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9]]).log()  # (4, 2)
    for name, log_q_try in (("router agrees", agree), ("router swapped", agree.flip(-1))):
        loss_try, hc_try, hz_try = mico_loss(p_try, log_q_try, torch.full((K_try,), -math.log(2)),
                                             lam=2.0)
        print(f"{name}: h_z_cond {hc_try:.3f}, h_z {hz_try:.3f} (log 2 = {math.log(2):.3f}), "
              f"loss {loss_try:.3f}")
    docs_try = np.array([0, 0, 1, 1])  # (D=4,) two clusters of two documents
    routes_try = route_queries(np.array([[0.9, 0.1], [0.3, 0.7]]))  # (2, 2)
    c_try = selective_search_curve(docs_try, routes_try, np.array([1, 1]), K_try)
    print("coverage", c_try["coverage"], "cost", c_try["cost"],
          "AUC", round(curve_auc(c_try["cost"], c_try["coverage"]), 3))


# %% 4. The toy world and its premise
def set_seed(seed: int) -> np.random.Generator:
    """PLUMBING: seed torch (model init, batches) and return the numpy Generator for the data.

    scikit-learn gets `random_state=seed` explicitly where it is called.
    """
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def make_dataset(cfg: Config, rng: np.random.Generator) -> dict:
    """A click log where a query and its clicked document share meaning more than words.

    Vocabulary: per topic `topic_words` document-side words and `synonyms` query-only words, per
    style `style_words` boilerplate words. A document has one topic and one style; its text is
    `doc_topic_len` topic words plus `doc_style_len` boilerplate words, so boilerplate dominates.
    A query clicks one document, uniformly at random (or, with `click_skew` s > 0, the document of
    popularity rank r with prob. ~ r^-s) and has 2-4 tokens, each a synonym of the document's
    topic with prob. `p_synonym`, else a document-side word of that topic.

    With `combo` c > 0, each document is with prob. c a combination document instead: the intent
    t is a number of n_bits = log2(T) bits; the document draws a uniformly in [0, T) and sets
    b = a XOR t. For each bit i it writes `aspect_len` words of the group "A, bit i, value a_i"
    and `aspect_len` words of the group "B, bit i, value b_i" (2 * 2 * n_bits groups of
    `aspect_words` words) in place of its intent words. Every aspect word occurs equally often
    under every intent, so no weighted sum of words reads such a document's intent; bit i is the
    XOR of two of its word groups. Queries are the same in every world.

    Returns a dict of numpy arrays: Cd (D, V) and Cq (N, V) token counts, Xd / Xq the same
    divided by sqrt(#tokens) (the encoders' input), doc_topic (D,), click (N,) the clicked
    document of each query, and the query index sets train / val / test (split by query).
    """
    T, S = cfg.n_topics, cfg.n_styles
    n_tw, n_sw, n_syn = cfg.topic_words, cfg.style_words, cfg.synonyms
    # PLUMBING: word ids, [topic words | style words | synonyms]
    topic_vocab = np.arange(T * n_tw).reshape(T, n_tw)  # (T, topic_words)
    style_vocab = T * n_tw + np.arange(S * n_sw).reshape(S, n_sw)  # (S, style_words)
    syn_vocab = T * n_tw + S * n_sw + np.arange(T * n_syn).reshape(T, n_syn)  # (T, synonyms)
    V = T * n_tw + S * n_sw + T * n_syn
    n_bits = max(1, (T - 1).bit_length())  # intents 0..T-1 written with n_bits bits
    n_asp = cfg.aspect_words if cfg.combo > 0 else 0
    # PLUMBING: [... | aspect groups], only when combo > 0: group (side, bit, value)
    aspect = V + np.arange(2 * n_bits * 2 * n_asp).reshape(2, n_bits, 2, n_asp)  # (2, bits, 2, W)
    V += 2 * n_bits * 2 * n_asp

    D, N = cfg.n_docs, cfg.n_queries
    doc_topic = rng.integers(0, T, size=D)  # (D,)
    doc_style = rng.integers(0, S, size=D)  # (D,)
    Cd = np.zeros((D, V), dtype=np.float32)  # (D, V)
    is_combo = np.zeros(D, dtype=bool)  # (D,)
    if cfg.combo > 0:
        is_combo = rng.random(D) < cfg.combo  # (D,) written in combination words
        doc_a = rng.integers(0, 2 ** n_bits, size=D)  # (D,) aspect a, uniform whatever the intent
        doc_b = doc_a ^ doc_topic  # (D,) b = a XOR t, so t = a XOR b
    for j in range(D):
        if is_combo[j]:
            intent_words = [rng.choice(aspect[side, i, (code >> i) & 1], size=cfg.aspect_len)
                            for side, code in ((0, doc_a[j]), (1, doc_b[j]))
                            for i in range(n_bits)]
        else:
            intent_words = [rng.choice(topic_vocab[doc_topic[j]], size=cfg.doc_topic_len)]
        words = intent_words + [rng.choice(style_vocab[doc_style[j]], size=cfg.doc_style_len)]
        np.add.at(Cd[j], np.concatenate(words), 1.0)

    if cfg.click_skew > 0:
        # PLUMBING: a few popular documents. Popularity ranks are a random order of the
        # documents, so popularity is independent of topic and style.
        rank = rng.permutation(D) + 1  # (D,) 1 = the most popular
        popularity = rank.astype(float) ** -cfg.click_skew  # (D,)
        click = rng.choice(D, size=N, p=popularity / popularity.sum())  # (N,)
    else:
        click = rng.integers(0, D, size=N)  # (N,)
    Cq = np.zeros((N, V), dtype=np.float32)  # (N, V)
    for i in range(N):
        t = doc_topic[click[i]]
        n_tok = rng.integers(2, 5)
        is_syn = rng.random(n_tok) < cfg.p_synonym  # (n_tok,)
        words = np.where(is_syn, rng.choice(syn_vocab[t], size=n_tok),
                         rng.choice(topic_vocab[t], size=n_tok))
        np.add.at(Cq[i], words, 1.0)

    # PLUMBING: split by query, so test queries are unseen at training time ("routes unseen
    # queries" is the claim). Queries are i.i.d., so the last rows are a random split.
    n_test = int(round(cfg.test_frac * N))
    n_val = int(round(cfg.val_frac * (N - n_test)))
    order = np.arange(N)
    train_idx, val_idx, test_idx = np.split(order, [N - n_test - n_val, N - n_test])
    Xd = Cd / np.sqrt(Cd.sum(1, keepdims=True))  # (D, V)
    Xq = Cq / np.sqrt(Cq.sum(1, keepdims=True))  # (N, V)
    return dict(Cd=Cd, Cq=Cq, Xd=Xd, Xq=Xq, doc_topic=doc_topic, click=click,
                is_combo=is_combo, train=train_idx, val=val_idx, test=test_idx)


def ridge_solve(X: np.ndarray, Y: np.ndarray, alphas: list[float]) -> dict:
    """PLUMBING: ridge regression with an intercept, one solve per strength alpha.

    Args: X (n, V) inputs, Y (n, E) targets. Returns {alpha: W (V + 1, E)}; predict with
    with_bias(X) @ W. The intercept (last row of W) is penalised too; with many rows it matters
    little.
    """
    Xb = torch.from_numpy(with_bias(X)).double()  # (n, V + 1)
    gram = Xb.T @ Xb  # (V + 1, V + 1)
    xty = Xb.T @ torch.from_numpy(Y).double()  # (V + 1, E)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)  # (V + 1, V + 1)
    return {a: torch.linalg.solve(gram + a * eye, xty).numpy() for a in alphas}


def with_bias(X: np.ndarray) -> np.ndarray:
    """PLUMBING: X (n, V) -> [X, 1] (n, V + 1)."""
    return np.concatenate([X, np.ones((len(X), 1), dtype=X.dtype)], axis=1)


def linear_decodability(data: dict, cfg: Config) -> float:
    """The premise: how well the best linear model of a document's own words reads its intent.

    A ridge classifier (one-hot intent targets) is fitted on a random half of the documents and
    scored on the other half; we keep the best strength of `ridge_alphas`, so this is an upper
    estimate. Chance is 1 / n_topics. Near 1, a click-trained linear model of the text can place
    every document, clicked or not, and co-training has nothing left to add.
    """
    rng = np.random.default_rng(cfg.seed + 1)  # its own generator: the main stream is untouched
    D, T = len(data["doc_topic"]), cfg.n_topics
    perm = rng.permutation(D)  # (D,)
    fit, held_out = perm[: D // 2], perm[D // 2:]
    Y = np.eye(T)[data["doc_topic"]]  # (D, T)
    Ws = ridge_solve(data["Xd"][fit], Y[fit], parse_weights(cfg.ridge_alphas))
    Xh = with_bias(data["Xd"][held_out])  # (D/2, V + 1)
    return max(float(np.mean((Xh @ W).argmax(1) == data["doc_topic"][held_out]))
               for W in Ws.values())


def supervised_doc_view(data: dict, cfg: Config) -> float:
    """The upper bound of MICO's document view: could its encoder read the intents at all?

    The same architecture (MICO's document trunk and head, same init) is trained with the true
    intents of the documents some training query clicked as labels (cross-entropy, Adam, lr,
    `steps` // 2 steps, `batch`); returns its accuracy on the documents no training query
    clicked. Near 1: the encoder can place unclicked documents, so co-training had something to
    find; near 1 / n_topics: no clustering by this encoder could reach them.
    """
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # PLUMBING: its own batches
    with torch.random.fork_rng():  # its own init: the caller's torch stream is untouched
        torch.manual_seed(cfg.seed + 2)
        model = MICO(data["Xd"].shape[1], cfg)
    opt = torch.optim.Adam(model.encoder_parameters(), lr=cfg.lr)
    clicked = np.zeros(len(data["doc_topic"]), dtype=bool)  # (D,)
    clicked[data["click"][data["train"]]] = True
    Xd, y = torch.from_numpy(data["Xd"]), torch.from_numpy(data["doc_topic"])  # (D, V), (D,)
    fit = torch.from_numpy(np.nonzero(clicked)[0])  # (n_clicked,)
    for _ in range(max(1, cfg.steps // 2)):
        b = fit[torch.randint(len(fit), (cfg.batch,), generator=gen)]  # (B,)
        loss = F.cross_entropy(model.doc_logits(Xd[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model.doc_logits(Xd[torch.from_numpy(~clicked)]).argmax(-1).numpy()  # (n_un,)
    return float(np.mean(pred == data["doc_topic"][~clicked])) if (~clicked).any() else 1.0


# %% 5. Baselines and rivals: k-means on text (+ clicks), random balanced clusters, the true topics
def lsa_embed(data: dict, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF/LSA vectors of documents and queries, L2-normalised.

    Returns ed (D, lsa_dim) and eq (N, lsa_dim). TF-IDF and LSA are fitted on the documents and
    the *training* queries only.
    """
    from sklearn.feature_extraction.text import TfidfTransformer

    # PLUMBING: fit TF-IDF and LSA on documents and training queries, so queries live in the same
    # space as the centroids and query-only synonyms get a direction (a fair baseline: fitting on
    # documents alone would drop every synonym and make the baseline a strawman).
    fit_rows = np.concatenate([data["Cd"], data["Cq"][data["train"]]])  # (D + N_train, V)
    tfidf = TfidfTransformer().fit(fit_rows)

    def tfidf_tensor(C: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(tfidf.transform(C).toarray().astype(np.float32))  # (rows, V)

    # DEVIATION: LSA by torch.svd_lowrank (randomised SVD, the algorithm of sklearn's
    # TruncatedSVD) because it obeys torch.set_num_threads; numpy's multi-threaded BLAS made this
    # step ten times slower on a shared, busy 2-core machine.
    torch.manual_seed(cfg.seed)  # PLUMBING: svd_lowrank draws a random test matrix
    _, _, V_lsa = torch.svd_lowrank(tfidf_tensor(fit_rows), q=cfg.lsa_dim, niter=4)  # (V, lsa)
    ed = F.normalize(tfidf_tensor(data["Cd"]) @ V_lsa, dim=1).numpy()  # (D, lsa_dim)
    eq = F.normalize(tfidf_tensor(data["Cq"]) @ V_lsa, dim=1).numpy()  # (N, lsa_dim)
    return ed, eq


def click_profile(eq: np.ndarray, click: np.ndarray, train_idx: np.ndarray, D: int) -> np.ndarray:
    """What the click log says about each document: the normalised sum of the vectors of the
    training queries that clicked it (a zero vector for a document no training query clicked).

    Args: eq (N, E) query vectors; click (N,) clicked document per query; train_idx the training
    queries (validation and test queries are never read); D documents. Returns (D, E).
    """
    prof = np.zeros((D, eq.shape[1]), dtype=np.float64)  # (D, E)
    np.add.at(prof, click[train_idx], eq[train_idx])
    norm = np.linalg.norm(prof, axis=1, keepdims=True)  # (D, 1)
    return prof / np.maximum(norm, 1e-12)  # (D, E)


def kmeans_route(ed: np.ndarray, eq: np.ndarray, K: int, n_init: int, seed: int):
    """k-means on document vectors ed (D, E); each query eq (N, E) ranks the centroids by distance.

    Returns doc_cluster (D,) and query_scores (N, K) = minus the squared distance to each centroid.
    """
    from sklearn.cluster import KMeans

    km = KMeans(K, n_init=n_init, random_state=seed).fit(ed)
    dist = ((eq[:, None, :] - km.cluster_centers_[None, :, :]) ** 2).sum(-1)  # (N, K)
    return km.labels_.astype(int), -dist


def kmeans_baseline(data: dict, cfg: Config, w: float = 0.0, emb=None):
    """Topical sharding: k-means on document vectors; a query goes to its nearest centroids.

    w = 0: the text-only floor (TF-IDF/LSA of the document's own words; reads no clicks).
    w > 0: the click-aware baseline: a document is represented by its text vector plus w times the
    profile of the training queries that clicked it, normalise(ed + w * click_profile). It reads
    the same click log as MICO, so it is the fair rival for "MICO learns from clicks".
    emb: precomputed (ed, eq) from lsa_embed, to share them across weights.
    Returns doc_cluster (D,), query_scores (N, K).
    """
    ed, eq = emb if emb is not None else lsa_embed(data, cfg)
    if w > 0:
        prof = click_profile(eq, data["click"], data["train"], len(ed))  # (D, E)
        ed = ed + w * prof  # (D, E)
        ed = ed / np.linalg.norm(ed, axis=1, keepdims=True)  # (D, E)
    return kmeans_route(ed, eq, cfg.K, cfg.kmeans_init, cfg.seed)


def select_click_weight(data: dict, cfg: Config, emb) -> tuple[float, dict]:
    """Choose the click weight w of the click-aware k-means on the validation queries (the same
    criterion as MICO's model selection: the AUC of coverage vs cost). Test queries are not read.

    Returns (best w, {w: validation AUC}).
    """
    val = data["val"]
    aucs = {}
    for w in parse_weights(cfg.click_weights):
        docs, scores = kmeans_baseline(data, cfg, w, emb)
        c = selective_search_curve(docs, route_queries(scores[val]), data["click"][val], cfg.K)
        aucs[w] = curve_auc(c["cost"], c["coverage"])
    return max(aucs, key=aucs.get), aucs


def word_model_profiles(data: dict, eq: np.ndarray, alphas: list[float]) -> dict:
    """The learned word model: ridge regression from a document's words to its click profile.

    Fitted on the documents some training query clicked (their profile is the target), it
    predicts a profile for every document no training query clicked; clicked documents keep
    their real profile. Args: data, eq (N, E) query vectors, alphas. Returns {alpha: (D, E)}.
    """
    D = len(data["doc_topic"])
    prof = click_profile(eq, data["click"], data["train"], D)  # (D, E)
    clicked = np.linalg.norm(prof, axis=1) > 0  # (D,)
    out = {}
    for a, W in ridge_solve(data["Xd"][clicked], prof[clicked], alphas).items():
        pred = with_bias(data["Xd"]) @ W  # (D, E)
        pred = pred / np.maximum(np.linalg.norm(pred, axis=1, keepdims=True), 1e-12)  # (D, E)
        out[a] = np.where(clicked[:, None], prof, pred)  # (D, E)
    return out


def select_word_model(data: dict, cfg: Config, emb) -> tuple[tuple, dict, tuple]:
    """The rung above k-means + clicks: k-means on normalise(ed + w * profile), where the profile
    of an unclicked document is the word model's prediction. (alpha, w) are chosen on the
    validation queries by AUC, as MICO's checkpoint is. Test queries are not read.

    Returns ((alpha, w), {(alpha, w): validation AUC}, (doc_cluster (D,), query_scores (N, K))).
    """
    ed, eq = emb
    val, aucs, fits = data["val"], {}, {}
    for a, prof in word_model_profiles(data, eq, parse_weights(cfg.ridge_alphas)).items():
        for w in parse_weights(cfg.click_weights):
            rep = ed + w * prof  # (D, E)
            rep = rep / np.linalg.norm(rep, axis=1, keepdims=True)  # (D, E)
            docs, scores = kmeans_route(rep, eq, cfg.K, cfg.kmeans_init, cfg.seed)
            c = selective_search_curve(docs, route_queries(scores[val]), data["click"][val],
                                       cfg.K)
            aucs[(a, w)] = curve_auc(c["cost"], c["coverage"])
            fits[(a, w)] = (docs, scores)
    best = max(aucs, key=aucs.get)
    return best, aucs, fits[best]


def random_baseline(D: int, N: int, K: int, rng: np.random.Generator):
    """The floor: documents dealt into K equal clusters at random; each query searches clusters in
    a random order. Coverage equals cost up to noise. Returns doc_cluster (D,), scores (N, K)."""
    doc_cluster = rng.permutation(np.arange(D) % K)  # (D,)
    return doc_cluster, rng.random((N, K))


def oracle_baseline(doc_topic: np.ndarray, click: np.ndarray, K: int):
    """The ceiling (only when K = #topics): true topics as clusters, each query routed to its true
    topic first. Returns doc_cluster (D,), scores (N, K)."""
    scores = np.zeros((len(click), K))  # (N, K)
    scores[np.arange(len(click)), doc_topic[click] % K] = 1.0
    return doc_topic % K, scores


# %% 6. Training and the report
def coverage_at_cost(cost: np.ndarray, coverage: np.ndarray, budget: float) -> float:
    """Coverage at a fixed share of documents scanned, linearly interpolated on the curve.

    Args: cost (K,), coverage (K,), budget in [0, 1]. Returns a float. This compares clusterings
    with different cluster sizes at the same price, which "coverage at m clusters" does not.
    """
    x = np.concatenate([[0.0], cost])  # (K+1,)
    y = np.concatenate([[0.0], coverage])  # (K+1,)
    return float(np.interp(budget, x, y))


def balance(doc_cluster: np.ndarray, K: int) -> dict:
    """Cluster-size balance: normalised entropy of the size distribution (1 = equal sizes,
    0 = one cluster holds everything), largest / mean size, and the number of empty clusters.

    Args: doc_cluster (D,), K. Returns a dict of floats.
    """
    sizes = np.bincount(doc_cluster, minlength=K).astype(float)  # (K,)
    frac = sizes / sizes.sum()  # (K,)
    nz = frac[frac > 0]
    entropy = float(-(nz * np.log(nz)).sum() / math.log(K))
    return dict(entropy=entropy, max_over_mean=float(sizes.max() / sizes.mean()),
                empty=int((sizes == 0).sum()))


def evaluate_mico(model: MICO, data: dict, idx: np.ndarray, K: int) -> tuple[dict, np.ndarray]:
    """Index every document, route the queries `idx`, return (curve dict, doc_cluster (D,))."""
    with torch.no_grad():
        doc_cluster = assign_documents(model.doc_logits(torch.from_numpy(data["Xd"])))  # (D,)
        q_logits = model.query_logits(torch.from_numpy(data["Xq"][idx]))  # (n, K)
    routes = route_queries(q_logits.numpy())  # (n, K)
    return selective_search_curve(doc_cluster, routes, data["click"][idx], K), doc_cluster


def summarise(name: str, curve: dict, doc_cluster: np.ndarray, target: np.ndarray,
              seen: np.ndarray, K: int, budget: float, doc_topic: np.ndarray | None = None) -> dict:
    """PLUMBING: the numbers of one method's row in the results table. target (N,) = the test
    queries' clicked documents (for the traffic balance); seen (N,) bool = whether some training
    query clicked that document too; doc_topic (D,) the true intents (for the purity)."""
    out = dict(cov1=float(curve["coverage"][0]), cost1=float(curve["cost"][0]),
               cov2=float(curve["coverage"][1]), cost2=float(curve["cost"][1]),
               lat1=float(curve["latency"][0]),
               cov_at_budget=coverage_at_cost(curve["cost"], curve["coverage"], budget),
               auc=curve_auc(curve["cost"], curve["coverage"]))
    out.update({f"balance_{k}": v for k, v in balance(doc_cluster, K).items()})
    # the same balance figure, counting clicks (traffic) instead of documents per cluster
    out["traffic_entropy"] = balance(doc_cluster[target], K)["entropy"]
    # coverage at one cluster, split by whether any training query clicked the target document
    for part, mask in (("clicked", seen), ("unclicked", ~seen)):
        out[f"cov1_{part}"] = float(curve["hit1"][mask].mean()) if mask.any() else None
    if doc_topic is not None:
        # purity: the share of documents whose cluster's most common intent is their own
        out["purity"] = float(sum(np.bincount(doc_topic[doc_cluster == k]).max()
                                  for k in range(K) if (doc_cluster == k).any()) / len(doc_topic))
    return {f"{name}_{k}": v for k, v in out.items()}


def _fmt(v, digits: int = 3) -> str:
    """PLUMBING: a number for the log, or n/a where it is undefined (None)."""
    return "n/a" if v is None else f"{v:.{digits}f}"


# PLUMBING: table name -> metrics key prefix
KEYS = {"MICO": "MICO", "k-means+clicks+words": "kmwords", "k-means+clicks": "kmclicks",
        "k-means": "kmeans", "random": "random", "oracle": "oracle"}


def train(cfg: Config) -> dict:
    """Train MICO on the click log (checkpoint chosen on validation AUC), fit every rival, and
    evaluate all of them on the same unseen test queries. Writes nothing; returns the results."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t0 = time.time()
    rng = set_seed(cfg.seed)
    data = make_dataset(cfg, rng)
    D, V = data["Xd"].shape
    K = cfg.K
    Xd, Xq = torch.from_numpy(data["Xd"]), torch.from_numpy(data["Xq"])
    train_q = torch.from_numpy(data["train"])  # (N_train,)
    click = torch.from_numpy(data["click"])  # (N,)

    model = MICO(V, cfg)
    # DEVIATION: psi is not in the outer optimiser (see train_step); constant lr, no warm-up
    # (paper: 1000 linear warm-up steps over a whole epoch; our runs are 2000 steps in all and
    # trained without one).
    opt = torch.optim.Adam(model.encoder_parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)  # PLUMBING: batch sampling

    history = {"step": [], "loss": [], "h_z_cond": [], "h_z": [], "q_z_loss": [],
               "eval_step": [], "val_auc": [], "used_clusters": []}
    best = (-1.0, None, -1)  # (val AUC, state_dict, step) for model selection
    bar = tqdm(range(cfg.steps), desc="mico", leave=False, mininterval=1.0)
    for step in bar:
        b = train_q[torch.randint(len(train_q), (cfg.batch,), generator=gen)]  # (B,)
        out = train_step(model, opt, Xq[b], Xd[click[b]], cfg)
        history["step"].append(step)
        for k, v in out.items():
            history[k].append(v)
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            # PAPER [V-code]: model selection by the validation AUC of the coverage-cost curve.
            # DEVIATION: every log_every steps; the official code selects once per epoch (its
            # one-epoch script therefore keeps the end of the epoch).
            curve, doc_cluster = evaluate_mico(model, data, data["val"], K)
            val_auc = curve_auc(curve["cost"], curve["coverage"])
            used = int((np.bincount(doc_cluster, minlength=K) > 0).sum())
            history["eval_step"].append(step + 1)
            history["val_auc"].append(val_auc)
            history["used_clusters"].append(used)
            if val_auc > best[0]:
                best = (val_auc, {k: v.clone() for k, v in model.state_dict().items()}, step + 1)
            tqdm.write(f"step {step + 1:5d} | loss {out['loss']:+.4f} | h_z_cond "
                       f"{out['h_z_cond']:.4f} | h_z {out['h_z']:.4f} | val AUC {val_auc:.4f} "
                       f"| clusters used {used}/{K}")
    bar.close()
    model.load_state_dict(best[1])

    # PLUMBING: evaluate every method on the same unseen test queries.
    test = data["test"]
    target = data["click"][test]  # (N_test,)
    budget = 1.0 / K * 1.5  # the cost of searching about 1.5 average-sized clusters
    with torch.no_grad():
        mico_docs = assign_documents(model.doc_logits(torch.from_numpy(data["Xd"])))  # (D,)
        mico_scores = model.query_logits(torch.from_numpy(data["Xq"][test])).numpy()  # (n, K)
    emb = lsa_embed(data, cfg)  # shared by both k-means baselines
    w_click, val_aucs = select_click_weight(data, cfg, emb)
    km_click = kmeans_baseline(data, cfg, w_click, emb)
    km_text = kmeans_baseline(data, cfg, 0.0, emb)
    (alpha_words, w_words), word_aucs, km_words = select_word_model(data, cfg, emb)
    methods = {  # name -> (doc_cluster (D,), routes of the test queries (N_test, K))
        "MICO": (mico_docs, route_queries(mico_scores)),
        "k-means+clicks+words": (km_words[0], route_queries(km_words[1][test])),
        "k-means+clicks": (km_click[0], route_queries(km_click[1][test])),
        "k-means": (km_text[0], route_queries(km_text[1][test])),
    }
    rnd_docs, rnd_scores = random_baseline(D, len(test), K, rng)
    methods["random"] = (rnd_docs, route_queries(rnd_scores))
    if K == cfg.n_topics:
        or_docs, or_scores = oracle_baseline(data["doc_topic"], target, K)
        methods["oracle"] = (or_docs, route_queries(or_scores))
    curves, clusterings = {}, {}
    for name, (docs, routes) in methods.items():
        curves[name] = selective_search_curve(docs, routes, target, K)
        curves[name]["hit1"] = docs[target] == routes[:, 0]  # (N_test,) found at one cluster
        clusterings[name] = docs

    metrics = {"best_step": best[2], "best_val_auc": best[0],
               "final_loss": history["loss"][-1], "final_h_z_cond": history["h_z_cond"][-1],
               "final_h_z": history["h_z"][-1], "budget": budget, "click_weight": w_click}
    metrics.update({f"kmclicks_val_auc_w{w:g}": a for w, a in val_aucs.items()})
    metrics.update(words_alpha=alpha_words, words_click_weight=w_words,
                   kmwords_val_auc=word_aucs[(alpha_words, w_words)],
                   linear_decodability=linear_decodability(data, cfg))
    seen = np.isin(target, data["click"][data["train"]])  # (N_test,)
    metrics["test_share_unclicked"] = float(1 - seen.mean())
    for name in curves:
        metrics.update(summarise(KEYS[name], curves[name], clusterings[name], target, seen, K,
                                 budget, data["doc_topic"]))
    # how much of MICO's gain over text-only k-means the clicks alone give (1 = all of it)
    for m in ("auc", "cov_at_budget", "cov1"):
        gain = metrics[f"MICO_{m}"] - metrics[f"kmeans_{m}"]
        clicks_gain = metrics[f"kmclicks_{m}"] - metrics[f"kmeans_{m}"]
        metrics[f"click_share_of_gain_{m}"] = clicks_gain / gain if gain > 0 else None
    # MICO's AUC on as many training queries as there are validation queries: far above its test
    # AUC means the router learned the training clicks, not the intents (README, "Why").
    seen_q = data["train"][: len(data["val"])]
    curve_tr, _ = evaluate_mico(model, data, seen_q, K)
    metrics["MICO_train_auc"] = curve_auc(curve_tr["cost"], curve_tr["coverage"])
    metrics["doc_view_upper_bound"] = supervised_doc_view(data, cfg)
    # What each compared arm got (EXPERIMENTS.md, section 7): a test checks this record.
    arms = {
        "MICO": {"data": "train clicks + doc text", "init": f"N(0, {cfg.init_first:g}) trunk, "
                 f"N(0, {cfg.init_last:g}) heads", "lr": cfg.lr, "lam": cfg.lam,
                 "steps": best[2], "chosen_on": "val AUC"},
        "k-means + clicks + words": {"data": "train clicks + doc text", "init": "k-means++",
                                     "ridge_alpha": alpha_words, "w": w_words,
                                     "checkpoint": "k-means to convergence",
                                     "chosen_on": "val AUC"},
        "k-means + clicks (w on val)": {"data": "train clicks + doc text", "init": "k-means++",
                                        "w": w_click, "checkpoint": "k-means to convergence",
                                        "chosen_on": "val AUC"},
        "k-means (LSA)": {"data": "doc text", "init": "k-means++",
                          "checkpoint": "k-means to convergence"},
    }
    return {"cfg": cfg, "t_start": t0, "history": history, "metrics": metrics, "arms": arms,
            "model": model,
            "curves": curves, "clusterings": clusterings, "val_aucs": val_aucs,
            "word_aucs": word_aucs,
            "n_docs": D, "n_test": len(test)}


# The claims this run checks, in order; the first `better` row is the folder's headline.
AT_BUDGET = "coverage @ 1.5/K of docs scanned"
NAMES = {"MICO": "MICO", "kmwords": "k-means + clicks + words",
         "kmclicks": "k-means + clicks (w on val)", "kmeans": "k-means (LSA)"}


def _claim(metric, key, base, expect, higher=True, method="MICO", **extra) -> dict:
    """PLUMBING: one CLAIMS row: `method`'s metrics key against `base`'s."""
    return dict(metric=metric, higher_is_better=higher, expect=expect,
                method=(NAMES[method], f"{method}_{key}"), baseline=(NAMES[base], f"{base}_{key}"),
                **extra)


CLAIMS = [
    # the strongest fair rival first: k-means on text + clicks, with a click-trained linear word
    # model filling in the clicks of documents no training query clicked.
    _claim("AUC of coverage vs cost", "auc", "kmwords", "better"),
    _claim("coverage @ 1 cluster, docs no training query clicked", "cov1_unclicked", "kmwords",
           "report"),
    # the rung below: a k-means that reads the same click log as MICO, and nothing else.
    _claim("AUC of coverage vs cost", "auc", "kmclicks", "better"),
    _claim(AT_BUDGET, "cov_at_budget", "kmclicks", "report"),
    _claim("coverage @ 1 cluster (test queries)", "cov1", "kmclicks", "report"),
    _claim("coverage @ 1 cluster, docs no training query clicked", "cov1_unclicked", "kmclicks",
           "report"),
    # the floor: k-means on the document text alone
    _claim(AT_BUDGET, "cov_at_budget", "kmeans", "better"),
    _claim("AUC of coverage vs cost", "auc", "kmeans", "better"),
    _claim("coverage @ 1 cluster (test queries)", "cov1", "kmeans", "better"),
    # the ladder's middle rung: what clicks alone give a clustering that is not MICO
    _claim("AUC of coverage vs cost", "auc", "kmeans", "report", method="kmclicks"),
    _claim("cluster-size entropy / log K", "balance_entropy", "kmeans", "better"),
    _claim("cost @ 1 cluster (share of docs)", "cost1", "kmeans", "report", higher=False),
    # why MICO can fall behind: it fits the training clicks, not the intents
    dict(metric="AUC of coverage vs cost, MICO on training vs unseen test queries",
         higher_is_better=True, expect="report",
         method=("MICO, training queries", "MICO_train_auc"),
         baseline=("MICO, test queries", "MICO_auc")),
    _claim("cluster purity (share of docs in their cluster's majority intent)", "purity",
           "kmwords", "report"),
]


def report(results: dict) -> dict:
    """The premise, the table, summary.json, the plots and the verdict. Returns the summary."""
    cfg, metrics, K = results["cfg"], results["metrics"], results["cfg"].K
    curves, budget = results["curves"], metrics["budget"]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The acceptance check of the world, written down before its headline was looked at
    # (README, "The world"): relevance must not be linearly readable from a document's words,
    # and enough test queries must want a document no training query clicked.
    premise = [
        premise_row("linear decodability: held-out accuracy of a ridge classifier from a "
                    f"document's words to its intent (chance {1 / cfg.n_topics:.3f})",
                    metrics["linear_decodability"], "<=", 0.5),
        premise_row("share of test queries whose document no training query clicked",
                    metrics["test_share_unclicked"], ">=", 0.1),
    ]
    premise.append(premise_row("upper bound of MICO's document view: its encoder trained on the "
                               "clicked documents' intents, accuracy on unclicked documents",
                               metrics["doc_view_upper_bound"]))
    if "oracle_auc" in metrics:
        premise.append(premise_row("ceiling: AUC of the true intents as clusters, each query "
                                   "routed to its intent (oracle)", metrics["oracle_auc"]))
    premise.append(premise_row("floor: AUC of a random balanced partition",
                               metrics["random_auc"]))
    print_premise(premise)
    headline = headline_rows(CLAIMS, metrics)
    plot(results, out)

    print(f"\nselective search on {results['n_test']} unseen test queries, {results['n_docs']} "
          f"documents, K = {K}")
    print(f"| method               | cov@1 | cost@1 | lat@1 | cov@2 | cost@2 | cov@{budget:.1%} "
          "|  AUC  | size entropy | traffic entropy | max/mean | empty |")
    for name in curves:
        m = {k.split("_", 1)[1]: v for k, v in metrics.items() if k.startswith(KEYS[name] + "_")}
        label = name + " (method)" if name == "MICO" else name
        print(f"| {label:20s} | {m['cov1']:.3f} | {m['cost1']:.3f}  | {m['lat1']:.3f} "
              f"| {m['cov2']:.3f} | {m['cost2']:.3f}  | {m['cov_at_budget']:.3f}     "
              f"| {m['auc']:.3f} | {m['balance_entropy']:.3f}        "
              f"| {m['traffic_entropy']:.3f}           "
              f"| {m['balance_max_over_mean']:.2f}     | {m['balance_empty']:5d} |")
    print(f"(MICO model from step {metrics['best_step']}, val AUC {metrics['best_val_auc']:.4f}; "
          f"k-means + clicks: w = {metrics['click_weight']:g} chosen on validation AUC "
          + ", ".join(f"{w:g}: {a:.3f}" for w, a in results["val_aucs"].items())
          + f"; k-means + clicks + words: alpha = {metrics['words_alpha']:g}, w = "
          f"{metrics['words_click_weight']:g}, val AUC {metrics['kmwords_val_auc']:.3f})")
    print("coverage @ 1 cluster for test queries whose document some training query clicked / "
          f"no training query clicked ({metrics['test_share_unclicked']:.0%} of test queries): "
          + ", ".join(f"{n} {_fmt(metrics[KEYS[n] + '_cov1_clicked'])} / "
                      f"{_fmt(metrics[KEYS[n] + '_cov1_unclicked'])}"
                      for n in ("MICO", "k-means+clicks+words", "k-means+clicks", "k-means")))
    print(f"MICO AUC on training queries {metrics['MICO_train_auc']:.3f} vs unseen test queries "
          f"{metrics['MICO_auc']:.3f}; cluster purity MICO {metrics['MICO_purity']:.3f}, "
          f"k-means+clicks+words {metrics['kmwords_purity']:.3f}, oracle "
          f"{metrics.get('oracle_purity', float('nan')):.3f}")
    shares = [metrics[f"click_share_of_gain_{m}"] for m in ("auc", "cov_at_budget", "cov1")]
    a, b, c = (_fmt(v, 2) for v in shares)
    print(f"share of MICO's gain over text-only k-means that clicks alone give (k-means + clicks):"
          f" AUC {a}, coverage @ {budget:.1%} {b}, coverage @ 1 cluster {c}")
    summary = write_summary(cfg, out, results["t_start"], metrics, headline, premise,
                            results["arms"])
    print_verdict(headline, cfg.quick, out, results["t_start"])
    return summary


def plot(results: dict, out: Path) -> None:
    """PLUMBING: recall-cost curves + cluster sizes (recall_cost.png); the objective's two terms
    and every method's validation AUC against MICO's training steps (training.png)."""
    import matplotlib

    if not IN_NOTEBOOK:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, curves, clusterings = results["history"], results["curves"], results["clusterings"]
    K, budget, m = results["cfg"].K, results["metrics"]["budget"], results["metrics"]
    style = {"MICO": "C3", "k-means+clicks+words": "C4", "k-means+clicks": "C1", "k-means": "C0",
             "random": "0.5", "oracle": "C2"}
    label = {n: n + " (method)" if n == "MICO" else n for n in style}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name, c in curves.items():
        x = np.concatenate([[0.0], c["cost"]])
        y = np.concatenate([[0.0], c["coverage"]])
        ls = ":" if name in ("random", "oracle") else "-"
        ax.plot(x, y, ls, marker="o", ms=3, color=style[name], lw=2.2 if name == "MICO" else 1.2,
                label=f"{label[name]} (AUC {curve_auc(c['cost'], c['coverage']):.3f})")
    ax.axvline(budget, color="k", lw=0.8, ls="--")
    ax.text(budget, 0.03, f" {budget:.1%} of docs", fontsize=8)
    ax.set_xlabel("share of documents scanned (top-m clusters, m = 1..K)")
    ax.set_ylabel("coverage of clicked documents")
    ax.set_title("selective search on unseen test queries")
    ax.legend(loc="lower right", fontsize=8)
    bars = ("MICO", "k-means+clicks+words", "k-means+clicks", "k-means")
    width = 0.8 / len(bars)
    for k, name in enumerate(bars):
        sizes = np.sort(np.bincount(clusterings[name], minlength=K))[::-1]
        ax2.bar(np.arange(K) + (k - 1.5) * width, sizes, width, color=style[name],
                label=label[name])
    ax2.axhline(len(clusterings["MICO"]) / K, color="k", lw=0.8, ls="--", label="D / K")
    ax2.set_xlabel("cluster (sorted by size)")
    ax2.set_ylabel("documents")
    ax2.set_title("cluster sizes")
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "recall_cost.png", dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(history["step"], history["h_z_cond"], lw=0.8, color="C3",
            label="h_z_cond = CE(P(Z|Y), Q(Z|X))")
    ax.plot(history["step"], history["h_z"], lw=0.8, color="C9", label="h_z = CE(p_bar, q_psi)")
    ax.axhline(math.log(K), color="k", lw=0.6, ls="--", label="log K")
    ax.set_xlabel("MICO training step")
    ax.set_ylabel("nats")
    ax.set_title("MICO (method): the two terms of the objective (training batches)")
    ax.legend(fontsize=8, loc="center right")
    # Metric against compute: MICO's validation AUC at each evaluation, against the rivals' best
    # validation AUC (their knobs chosen on the same queries; k-means has no step budget).
    ax2.plot(history["eval_step"], history["val_auc"], marker="o", color="C3",
             label=label["MICO"])
    ax2.axvline(m["best_step"], color="C3", ls=":", lw=0.8, label=f"chosen step {m['best_step']}")
    ax2.axhline(m["kmwords_val_auc"], color=style["k-means+clicks+words"], ls="--",
                label="k-means+clicks+words (best alpha, w)")
    ax2.axhline(max(results["val_aucs"].values()), color=style["k-means+clicks"], ls="--",
                label="k-means+clicks (best w)")
    ax2.set_xlabel("MICO training step")
    ax2.set_ylabel("AUC of coverage vs cost, validation queries")
    ax2.set_title("validation AUC against training steps")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)


# %% 7. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    # PLUMBING: tiny matrices; one thread was faster than two in our measurement (README, Run).
    torch.set_num_threads(1)
    prepare_out_dir(cfg.out_dir)  # before training: a bad --out-dir fails in a second
    return report(train(cfg))


# %% Appendix: run plumbing (the same bytes in every folder; skip on a first read)
# PLUMBING: tests/test_repo.py keeps this cell identical in all ten files and the template.
# It parses and validates the command line, prepares the run folder, builds the claim rows,
# writes summary.json and prints the run's last lines (CONTRIBUTING.md, section 2).
class _Parser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line on stderr and exit code 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> Config:
    """The CLI, generated from Config's fields; in a notebook, --quick (never the kernel's argv)."""
    if argv is None and IN_NOTEBOOK:
        argv = ["--quick"]
    p = _Parser(prog=f"{FOLDER}/train.py", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=meta["help"])
            continue
        extra = f"; range {meta['range']}" if "range" in meta else ""
        p.add_argument(flag, type=type(f.default), default=f.default,
                       choices=meta.get("choices"),
                       help=meta["help"] + f" (default: %(default)s{extra})")
    cfg = Config(**vars(p.parse_args(argv)))
    problem = validate(cfg)
    if problem:
        p.error(problem)
    return cfg


_RANGE = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])])$")


def validate(cfg: Config) -> str | None:
    """The first broken rule as one line ("--steps must be in [1, inf), got -3"), or None."""
    for f in dataclasses.fields(cfg):
        value, spec = getattr(cfg, f.name), f.metadata.get("range")
        if spec is None:
            continue
        lo_br, lo, hi, hi_br = _RANGE.match(spec).groups()
        lo, hi = float(lo), float(hi)
        ok = (value >= lo if lo_br == "[" else value > lo) and (value <= hi if hi_br == "]"
                                                                 else value < hi)
        if not ok:
            return f"--{f.name.replace('_', '-')} must be in {spec}, got {value}"
    if str(getattr(cfg, "device", "cpu")).startswith("cuda"):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return "--device cuda: no CUDA GPU is available on this machine"
    return check_config(cfg)


def prepare_out_dir(path: str) -> Path:
    """Create the run folder and prove it is writable *before* any training (one-line error)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"{FOLDER}/train.py: error: --out-dir {path!r} is not a writable "
                         f"folder ({e.strerror or e})") from None
    return out


def premise_row(name: str, value: float, cmp: str | None = None,
                threshold: float | None = None) -> dict:
    """A row of `premise`: a statistic of the toy, and whether it passes its stated threshold.

    Without cmp/threshold it is a reported value (an upper bound, a ceiling): holds is None.
    """
    holds = None if cmp is None else bool(value >= threshold if cmp == ">=" else value <= threshold)
    return {"name": name, "value": float(value), "cmp": cmp, "threshold": threshold,
            "holds": holds}


def print_premise(premise: list[dict]) -> None:
    """The premise rows, printed before the headline: does this toy pose the paper's problem?"""
    print("\nPremise (does this toy pose the paper's problem?):")
    for r in premise:
        test = ("" if r["cmp"] is None else
                f" (want {r['cmp']} {r['threshold']:.4g}: {'holds' if r['holds'] else 'FAILS'})")
        print(f"  {r['name']}: {r['value']:.4g}{test}")


def headline_rows(claims: list[dict], values: dict) -> list[dict]:
    """summary.json's headline rows from the CLAIMS table: (name, key) pairs read from values."""
    rows = []
    for c in claims:
        row = {"metric": c["metric"], "higher_is_better": c["higher_is_better"],
               "expect": c["expect"],
               "method": {"name": c["method"][0], "value": float(values[c["method"][1]])},
               "baseline": {"name": c["baseline"][0], "value": float(values[c["baseline"][1]])}}
        if "margin" in c:
            row["margin"], row["margin_why"] = float(c["margin"]), c["margin_why"]
        rows.append(row)
    return rows


# What `expect` means (CONTRIBUTING.md, section 2).
EXPECT = {"better": "method should beat baseline",
          "level": "control: within the stated margin expected",
          "report": "diagnostic, not a claim"}
LEVEL_TOL = 0.02  # a level row without its own margin: within 2 % of the larger value


def held(row: dict) -> bool | None:
    """Did this seed's row show what it claims? The rule tools/run_all.py counts (k/5)."""
    m, b = row["method"]["value"], row["baseline"]["value"]
    if row["expect"] == "report":
        return None
    if row["expect"] == "level":
        tol = row.get("margin", LEVEL_TOL * max(abs(m), abs(b), 1e-12))
        return abs(m - b) <= tol
    return (m > b) if row["higher_is_better"] else (m < b)


def write_summary(cfg: Config, out: Path, t_start: float, metrics: dict, headline: list[dict],
                  premise: list[dict], arms: dict) -> dict:
    """summary.json: what tools/run_all.py and the tests read. Returns it."""
    summary = {"folder": FOLDER, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
               "wall_seconds": time.time() - t_start, "metrics": metrics, "headline": headline,
               "premise": premise, "arms": arms}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def seed_record(row: dict) -> str:
    """How often this row held over the seeds in RESULTS.md (written by tools/run_all.py)."""
    # In a notebook there is no __file__: look in the kernel's folder and the one above it.
    here = Path(globals()["__file__"]).resolve().parent if "__file__" in globals() else Path.cwd()
    results = next((d / "RESULTS.md" for d in (here.parent, here) if (d / "RESULTS.md").is_file()),
                   None)
    if results is None:
        return "no RESULTS.md here (the record over seeds 0-4 is in the course repository)"
    arrow = "↑" if row["higher_is_better"] else "↓"
    for line in results.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (len(cells) >= 6 and cells[0] == f"{row['metric']} {arrow}"
                and cells[1] == row["method"]["name"] and cells[3] == row["baseline"]["name"]):
            return f"RESULTS.md: {cells[-1]}"
    return "row not in RESULTS.md yet"


def print_verdict(headline: list[dict], quick: bool, out: Path, t_start: float) -> None:
    """One plain line per headline row, a --quick warning, and the files this run wrote."""
    print("\nVerdict (this seed):")
    for row in headline:
        m, b, ok = row["method"]["value"], row["baseline"]["value"], held(row)
        if row["expect"] == "level":
            seen = "level, held" if ok else "not level"
            seen += f" (margin {row['margin']:.3g})" if "margin" in row else " (within 2 %)"
        else:
            ahead = (m > b) if row["higher_is_better"] else (m < b)
            seen = "method ahead" if ahead else "baseline ahead"
            close = abs(m - b) <= LEVEL_TOL * max(abs(m), abs(b), 1e-12)
            seen += " (by < 2 %)" if close else ""
        direction = "higher" if row["higher_is_better"] else "lower"
        print(f"  [{row['expect']}] {row['metric']} ({direction} is better): "
              f"{row['method']['name']} {m:.4g} vs {row['baseline']['name']} {b:.4g} -> {seen}; "
              f"{EXPECT[row['expect']]}; {seed_record(row)}")
    if quick:
        print("NOTE: --quick is a smoke run (seconds, tiny data); its numbers are not meant to "
              "show the paper's effect. Run without --quick for that.")
    written = sorted(p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= t_start)
    print("Files written:", ", ".join(str(p) for p in written) or "none")


def unsolved_exercises() -> list[int]:
    """The exercises of a student copy whose code is still `raise NotImplementedError`."""
    text = Path(__file__).read_text() if "__file__" in globals() else ""
    return sorted({int(n) for n in re.findall(r'NotImplementedError\("Exercise (\d+)', text)})


# %% Run (in a notebook: the --quick configuration; main(["--seed", "1"]) for another)
if __name__ == "__main__":
    try:
        main()
    except NotImplementedError:
        todo = ", ".join(map(str, unsolved_exercises())) or "?"
        raise SystemExit(f"{FOLDER}/train.py: exercise(s) {todo} not solved yet: fill in the "
                         "code, then check it with `python -m pytest -m exercise`") from None
