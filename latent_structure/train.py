"""Latent modality structures: exact alignment loses information; three regularisers give it back.

Citation: Qian Jiang, Changyou Chen, Han Zhao, Liqun Chen, Qing Ping, Son Dinh Tran, Yi Xu,
Belinda Zeng, Trishul Chilimbi. "Understanding and Constructing Latent Modality Structures in
Multi-modal Representation Learning", CVPR 2023, pp. 7661-7671. arXiv:2303.05952.
Implemented: Theorem 3.1 (the information gap Delta_p), Section 4 (the base loss L_Con),
Section 4.1 (deep feature separation: L_Ortho, L^i_Con, L^i_Uni), Section 4.2 (Brownian bridge,
Eq. (1) and L_Br), Section 4.3 (geometric consistency: L_GC and L^a_GC), and Section 3.1's
forced-alignment experiment (L_Align). Only Eq. (1) carries a number in the paper; the other
losses are cited by their section and symbol.

The idea. Contrastive image-text training pulls each image towards its caption. Theorem 3.1 says
that if the two features become *equal*, they can only keep the information the two modalities
share, so a downstream task that needs image-only information pays at least the information gap
Delta_p = |I(X_T;Y) - I(X_V;Y)| in cross-entropy. The paper therefore does not chase perfect
alignment; it adds structure to the latent space: extra "independent" features orthogonal to the
shared ones (Sep), a Brownian bridge on which augmented images must lie between image and text
(Br), and symmetric similarity geometry across modalities and augmentations (GC).

The toy. A 4-way class c and 6-d content s appear in both modalities; an image-only bit a and a
text-only bit b appear in one each. The target Y = 2c + a (8 classes) needs the image-only bit, so
Delta_p = ln 2 exactly and perfectly aligned features reach at most 50% accuracy on Y. We train
two small towers with each variant, then linear-probe the frozen image backbone for Y, classify c
zero-shot with text prototypes (clean and shifted images), and measure the modality gap.

Notation (paper -> code):
    X_V, X_T          x_v, x_t        image / text inputs, (N, D_in)
    Z_V, Z_T          z_v, z_t        shared (aligned) features, unit norm, (B, E)
    Z^a_V, Z^a_T      z_v_a, z_t_a    features of the augmented view, (B, E)
    Z^i_V, Z^i_T      zi_v, zi_t      independent features of Sep, unit norm, (B, E)
    tau               tau             temperature of InfoNCE
    t (bridge)        bridge_t        position on the Brownian bridge, 0.25 in the paper
    t (uniformity)    uni_t           Gaussian-potential scale, 2 in the paper
    Delta_p           information_gap(pmf)
    Y                 y = 2c + a      downstream target (8 classes)
Dimensions: N examples, B batch, D_in input width (32), H backbone width (16), E embedding (16).

What the miniature simplifies: synthetic vectors instead of images and captions, 2-layer MLP
towers instead of ResNet-50/BERT, Gaussian input noise instead of crop/flip/EDA, 4,000 pairs
instead of CC3M, a handful of seconds of Adam per variant, and no ALBEF fusion experiments.

Run:   python latent_structure/train.py          (all six variants, one seed, ~30-60 s on CPU)
Ends:  a table `variant | probe acc Y | probe CE | zero-shot | zero-shot shifted | gap` where
       Sep's probe accuracy is near 1.0, CLIP's ~0.75 and +Align's lower still, with the two
       ceilings (0.5 for aligned features, 1.0 from the image) printed above it.
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FOLDER = "latent_structure"
VARIANTS = ("clip", "align", "sep", "br", "gc", "all")
VARIANT_NAMES = {"clip": "CLIP (L_Con)", "align": "+ Align", "sep": "+ Sep", "br": "+ Br",
                 "gc": "+ GC", "all": "+ Sep+Br+GC"}


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu only in this folder"})
    steps: int = field(default=1500, metadata={"help": "Adam steps per variant"})  # paper: 64 ep
    variants: str = field(default=",".join(VARIANTS),
                          metadata={"help": "comma-separated subset of " + ",".join(VARIANTS)})
    n_train: int = field(default=4000, metadata={"help": "training pairs"})  # paper: CC3M
    n_test: int = field(default=2000, metadata={"help": "test pairs"})
    batch: int = field(default=128, metadata={"help": "batch size N"})  # paper: 128 (CyCLIP)
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})  # paper: 5e-4 AdamW
    # DEVIATION: a fixed temperature; CyCLIP learns the logit scale (clamped at 100).
    tau: float = field(default=0.1, metadata={"help": "InfoNCE temperature"})  # paper: learned
    inmodal: bool = field(default=False, metadata={
        "help": "add the in-modal terms V2V, T2T to the base loss (the paper's L_Con)"})
    lam_sep: float = field(default=1.0, metadata={"help": "weight of L_Sep [R]"})
    lam_sep_info: float = field(default=1.0, metadata={
        "help": "weight of L^i_Con + L^i_Uni inside L_Sep (paper: 1)"})
    lam_br: float = field(default=1.0, metadata={"help": "weight of L_Br [R]"})
    lam_gc: float = field(default=0.25, metadata={"help": "weight of L_GC + L^a_GC [R]"})
    lam_align: float = field(default=5.0, metadata={"help": "weight of the forced alignment"})
    bridge_t: float = field(default=0.25, metadata={"help": "Brownian-bridge position t"})
    uni_t: float = field(default=2.0, metadata={"help": "uniformity potential scale t"})
    sigma_anchor: float = field(default=0.05, metadata={"help": "input noise of the anchor view"})
    sigma_aug: float = field(default=0.15, metadata={"help": "input noise of the augmented view"})
    sigma_shift: float = field(default=0.5, metadata={"help": "input noise of the shifted test"})
    log_every: int = field(default=300, metadata={"help": "steps between log lines"})
    eval_every: int = field(default=300, metadata={
        "help": "steps between probe/gap checkpoints (the curves in the plot)"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=60, n_train=600, n_test=400, log_every=20, eval_every=60)
DEVICES = ("cpu",)


class _Parser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line on stderr and exit code 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> Config:
    p = _Parser(prog=f"{FOLDER}/train.py", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                           choices=DEVICES if f.name == "device" else None)
    cfg = Config(**vars(p.parse_args(argv)))
    for name in ("steps", "n_train", "n_test", "log_every", "eval_every"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch < 2:
        p.error(f"--batch must be >= 2 (InfoNCE needs negatives), got {cfg.batch}")
    if cfg.tau <= 0:
        p.error(f"--tau must be > 0, got {cfg.tau}")
    if not 0.0 <= cfg.bridge_t <= 1.0:
        p.error(f"--bridge-t must lie in [0, 1], got {cfg.bridge_t}")
    for name in ("lam_sep", "lam_sep_info", "lam_br", "lam_gc", "lam_align", "uni_t",
                 "sigma_anchor", "sigma_aug", "sigma_shift"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    bad = [v for v in cfg.variants.split(",") if v not in VARIANTS]
    if bad or not cfg.variants:
        p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}")
    return cfg


# %% 3. Seeding
def set_seed(seed: int) -> None:
    """PLUMBING: seed random, numpy and torch; sklearn gets random_state=seed explicitly."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# %% 4. Toy data and its exact information gap
# PLUMBING: the latent factors and how each modality sees them.
N_CLASS, D_CONTENT, D_NOISE, D_IN = 4, 6, 4, 32
D_LATENT = N_CLASS + D_CONTENT + 1 + D_NOISE  # 15 = one-hot c, s, the private bit, nuisance


def toy_pmf() -> np.ndarray:
    """The exact joint pmf of the discrete latents (c, a, b), shape (4, 2, 2): all uniform."""
    return np.full((N_CLASS, 2, 2), 1.0 / (N_CLASS * 4))


def _cond_entropy(pmf: np.ndarray, given, target) -> float:
    """H(target | given) in nats, for functions given(c, a, b), target(c, a, b) of the latents."""
    joint, marg = {}, {}
    for (c, a, b), p in np.ndenumerate(pmf):
        if p == 0:
            continue
        g, y = given(c, a, b), target(c, a, b)
        joint[(g, y)] = joint.get((g, y), 0.0) + p
        marg[g] = marg.get(g, 0.0) + p
    return float(-sum(p * math.log(p / marg[g]) for (g, _), p in joint.items()))


# In the toy, X_V is an injective map of (c, s, a, noise) and X_T of (c, s, b, noise); s and the
# noise are independent of Y, so X_V carries exactly (c, a) about Y and X_T exactly (c, b).
def _y(c, a, b):
    return 2 * c + a


def _x_v(c, a, b):
    return (c, a)


def _x_t(c, a, b):
    return (c, b)


def information_gap(pmf: np.ndarray) -> float:
    """Theorem 3.1: Delta_p = |I(X_T; Y) - I(X_V; Y)| in nats, from the latent pmf (4, 2, 2)."""
    h_y = _cond_entropy(pmf, lambda c, a, b: 0, _y)  # H(Y)
    # PAPER: I(X;Y) = H(Y) - H(Y|X), for X = X_T and X = X_V.
    i_t = h_y - _cond_entropy(pmf, _x_t, _y)
    i_v = h_y - _cond_entropy(pmf, _x_v, _y)
    # Theorem 3.1: Delta_p := |I(X_T; Y) - I(X_V; Y)|
    return abs(i_t - i_v)


def theorem_gap_terms(pmf: np.ndarray) -> dict:
    """Both sides of Theorem 3.1 for the best perfectly aligned feature Z = c (all they share).

    Returns H(Y | Z), H(Y | X_T, X_V), their difference (the excess cross-entropy), Delta_p, and
    the best accuracy on Y any classifier of Z can reach (the aligned-feature ceiling).
    """
    # PAPER [R] (the appendix proof was not available; this is the standard argument): for
    # Z = Z_T = Z_V, H(Y|Z) >= max(H(Y|X_T), H(Y|X_V)) by data processing and
    # H(Y|X_T,X_V) <= min(...), so H(Y|Z) - H(Y|X_T,X_V) >= Delta_p. Here Z = c is the most an
    # aligned feature can hold, and the bound is tight.
    h_y_z = _cond_entropy(pmf, lambda c, a, b: c, _y)
    h_y_x = _cond_entropy(pmf, lambda c, a, b: (c, a, b), _y)
    # PAPER: the accuracy ceiling given Z is sum_z max_y p(z, y).
    best = {}
    for (c, a, b), p in np.ndenumerate(pmf):
        best.setdefault(c, {}).setdefault(_y(c, a, b), 0.0)
        best[c][_y(c, a, b)] += p
    ceiling = sum(max(d.values()) for d in best.values())
    return {"H_Y_given_Z": h_y_z, "H_Y_given_X": h_y_x, "excess_ce": h_y_z - h_y_x,
            "delta_p": information_gap(pmf), "aligned_acc_ceiling": float(ceiling)}


def make_dataset(cfg: Config, n: int, rng: np.random.Generator) -> dict:
    """Draw n image-text pairs. Returns float32 arrays x_v, x_t (n, 32) and ints c, a, b, y (n,).

    The mixing matrices are fixed (seed 0), so every seed sees the same 'sensors'; the samples
    follow `rng`.
    """
    # DEVIATION: synthetic vectors with known latents instead of CC3M images and captions, so
    # that Delta_p is known exactly.
    mix = np.random.default_rng(0)
    w_v = mix.normal(size=(D_LATENT, D_IN)) / math.sqrt(D_LATENT)  # (15, 32)
    w_t = mix.normal(size=(D_LATENT, D_IN)) / math.sqrt(D_LATENT)  # (15, 32)
    c = rng.integers(0, N_CLASS, size=n)  # (n,)
    a = rng.integers(0, 2, size=n)  # (n,) image-only bit
    b = rng.integers(0, 2, size=n)  # (n,) text-only bit
    s = rng.normal(size=(n, D_CONTENT))  # (n, 6) shared content
    onehot = 2.0 * np.eye(N_CLASS)[c]  # (n, 4)
    lat_v = np.concatenate([onehot, s, (2 * a - 1)[:, None], rng.normal(size=(n, D_NOISE))], 1)
    lat_t = np.concatenate([onehot, s, (2 * b - 1)[:, None], rng.normal(size=(n, D_NOISE))], 1)
    x_v = np.tanh(lat_v @ w_v).astype(np.float32)  # (n, 32)
    x_t = np.tanh(lat_t @ w_t).astype(np.float32)  # (n, 32)
    return {"x_v": x_v, "x_t": x_t, "c": c, "a": a, "b": b, "y": 2 * c + a}


# %% 5. Model
class Tower(nn.Module):
    """One modality's encoder: backbone h (the features the linear probe reads), a shared
    projection head P (gives z) and Sep's extra independent head Q (gives z^i)."""

    def __init__(self, d_in: int = D_IN, d_hidden: int = 64, d_h: int = 16, d_emb: int = 16):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(),
                                      nn.Linear(d_hidden, d_h))
        self.shared_head = nn.Linear(d_h, d_emb)  # P
        self.indep_head = nn.Linear(d_h, d_emb)  # Q, used by Sep only

    def forward(self, x: torch.Tensor):
        """x (B, D_in) -> (h (B, H), z (B, E) unit norm, z^i (B, E) unit norm)."""
        h = self.backbone(x)  # (B, H)
        z = F.normalize(self.shared_head(h), dim=-1)  # (B, E)
        z_i = F.normalize(self.indep_head(h), dim=-1)  # (B, E)
        return h, z, z_i


# %% 6. The paper's core: losses
def info_nce(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """One direction of InfoNCE: row j of q must pick k_j among all k.

    Args: q (B, E), k (B, E) unit norm; tau > 0. Returns a scalar.
    """
    # PAPER (Sec. 4): L_Q2K = -1/N sum_j log exp(<q_j,k_j>/tau) / sum_k exp(<q_j,k_k>/tau)
    logits = q @ k.T / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def contrastive_loss(z_v, z_t, z_v_a=None, z_t_a=None, tau: float = 0.1) -> torch.Tensor:
    """The base loss. Without augmented views: the symmetric CLIP loss (L_V2T + L_T2V) / 2.
    With them: the paper's L_Con = 1/4 (L_V2T + L_T2V + L_V2V + L_T2T).

    Args: z_v, z_t (B, E); optional z_v_a, z_t_a (B, E) of the augmented view. Returns a scalar.
    """
    cross = info_nce(z_v, z_t, tau) + info_nce(z_t, z_v, tau)
    if z_v_a is None:
        return cross / 2
    # PAPER (Sec. 4): the in-modal denominator runs over the *augmented* batch, as in the CyCLIP
    # code the paper builds on (the printed <z_Vj, z_Vk> there is a typo or a simplification).
    inmodal = info_nce(z_v, z_v_a, tau) + info_nce(z_t, z_t_a, tau)
    # Sec. 4: L_Con = 1/4 (L_V2T + L_T2V + L_V2V + L_T2T)
    return (cross + inmodal) / 4


def ortho_loss(z_v, zi_v, z_t, zi_t) -> torch.Tensor:
    """Sec. 4.1 L_Ortho: independent features must be orthogonal to the shared ones.

    Args: all (B, E) unit norm. Returns a scalar (0 when every z^i is orthogonal to its z).
    """
    # Sec. 4.1: L_Ortho = 1/N sum_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2)
    return ((z_v * zi_v).sum(-1) ** 2 + (z_t * zi_t).sum(-1) ** 2).mean()


def indep_contrastive_loss(zi_v, zi_v_a, zi_t, zi_t_a, tau: float) -> torch.Tensor:
    """Sec. 4.1 L^i_Con = L^i_V2V + L^i_T2T: in-modal InfoNCE on the independent features.

    Args: (B, E) unit norm independent features of the anchor and augmented views.
    """
    # PAPER: the printed numerator <z^i_Vj, z^i_Vj> is identically 1 (a typo); the positive must
    # be the independent feature of the augmented view, and the denominator runs over that batch.
    # Sec. 4.1: L^i_Con = L^i_V2V + L^i_T2T
    return info_nce(zi_v, zi_v_a, tau) + info_nce(zi_t, zi_t_a, tau)


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola's uniformity for one modality: log mean_{j != k} G_t(z_j, z_k).

    Args: z (B, E) unit norm, t > 0. Returns a scalar; lower means more spread out.
    """
    # BEGIN SOLUTION (exercise 3)
    # Exercise 3: compute the uniformity loss log mean_{j != k} exp(-t ||z_j - z_k||^2).
    # Hint: leave out the diagonal j = k (each term there is exp(0) = 1).
    sq = (z[:, None, :] - z[None, :, :]).pow(2).sum(-1)  # (B, B) squared distances
    off = ~torch.eye(z.shape[0], dtype=torch.bool)  # (B, B) mask of j != k
    # Sec. 4.1 [R]: G_t(u, v) = exp(-t ||u - v||^2), averaged over the pairs j != k, in the log.
    loss = torch.log(torch.exp(-t * sq[off]).mean())
    # END SOLUTION
    return loss


def sep_loss(z_v, zi_v, zi_v_a, z_t, zi_t, zi_t_a, tau: float, uni_t: float = 2.0,
             info_weight: float = 1.0) -> torch.Tensor:
    """Sec. 4.1 L_Sep = L_Ortho + L^i_Con + L^i_Uni (deep feature separation).

    Args: shared z (B, E), independent z^i of the anchor and augmented views (B, E).
    `info_weight` scales the two informativeness terms (1 in the paper; 0 gives the degenerate
    case the paper warns about, where z^i may be any orthogonal noise).
    """
    l_ortho = ortho_loss(z_v, zi_v, z_t, zi_t)
    l_con_i = indep_contrastive_loss(zi_v, zi_v_a, zi_t, zi_t_a, tau)
    # DEVIATION [R]: the printed L^i_Uni puts both modalities and the j = k terms inside one log;
    # we use the standard per-modality form, summed: it has the same minimisers and a clean 0/-4t
    # range per modality (the j = k terms only add a constant inside the log).
    l_uni_i = uniformity_loss(zi_v, uni_t) + uniformity_loss(zi_t, uni_t)
    # Sec. 4.1: L_Sep = L_Ortho + L^i_Con + L^i_Uni
    return l_ortho + info_weight * (l_con_i + l_uni_i)


def bridge_mean(z_v: torch.Tensor, z_t: torch.Tensor, t: float) -> torch.Tensor:
    """Eq. (1)'s mean: mu(Z_V, Z_T, t) = (t Z_V + (1-t) Z_T) / ||t Z_V + (1-t) Z_T||.

    Args: z_v, z_t (B, E) unit norm; t in [0, 1] a constant. Returns mu (B, E), unit norm.
    t = 1 gives Z_V and t = 0 gives Z_T, so the paper's t = 0.25 sits 3/4 of the way to the text.
    """
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: compute the Brownian-bridge mean mu(Z_V, Z_T, t) of Eq. (1), on the sphere.
    # Eq. (1): mu = (t Z_V + (1 - t) Z_T) / ||t Z_V + (1 - t) Z_T||
    mix = t * z_v + (1.0 - t) * z_t  # (B, E)
    mu = mix / mix.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (B, E)
    # END SOLUTION
    return mu


def bridge_loss(z_v, z_t, z_v_a, t: float = 0.25) -> torch.Tensor:
    """Sec. 4.2 L_Br: the augmented image must lie at the bridge mean between image and text.

    Args: z_v, z_t, z_v_a (B, E) unit norm; t the bridge position. Returns a scalar.
    Maximum likelihood under Eq. (1)'s fixed variance t(1-t) I is this mean squared error.
    """
    mu = bridge_mean(z_v, z_t, t)  # (B, E)
    # Sec. 4.2: L_Br = 1/N sum_j ||z^a_Vj - mu(z_Vj, z_Tj, t)||^2
    # (the paper's printed second line drops the `2 - 2 *` and the square root; we use line one)
    return (z_v_a - mu).pow(2).sum(-1).mean()


def gc_loss(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Sec. 4.3 L_GC: cross-modal symmetry plus in-modal consistency (CyCLIP's two cyclic terms).

    Args: z_v, z_t (B, E) unit norm. Returns a scalar; 0 when z_t = z_v R for a symmetric
    orthogonal R (then every similarity matrix below is symmetric and equal).
    """
    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: compute L_GC of Sec. 4.3 (sum over j, k of both squared differences, over N).
    # Hint: the three similarity matrices S_VT, S_VV, S_TT hold every <.,.> the sum needs.
    n = z_v.shape[0]
    s_vt = z_v @ z_t.T  # (B, B) <z_Vj, z_Tk>
    s_vv = z_v @ z_v.T  # (B, B) <z_Vj, z_Vk>
    s_tt = z_t @ z_t.T  # (B, B) <z_Tj, z_Tk>
    # Sec. 4.3: L_GC = 1/N sum_j sum_k [(<z_Vj,z_Tk> - <z_Vk,z_Tj>)^2
    #                                   + (<z_Vj,z_Vk> - <z_Tj,z_Tk>)^2]
    loss = ((s_vt - s_vt.T).pow(2).sum() + (s_vv - s_tt).pow(2).sum()) / n
    # END SOLUTION
    return loss


def gc_aug_loss(z_v, z_t, z_v_a, z_t_a) -> torch.Tensor:
    """Sec. 4.3 L^a_GC: the similarity geometry must survive augmentation.

    Args: anchor z_v, z_t and augmented z_v_a, z_t_a, all (B, E) unit norm. Returns a scalar.
    """
    n = z_v.shape[0]
    in_v = (z_v @ z_v.T - z_v_a @ z_v_a.T).pow(2).sum()  # sum_jk (<z_Vj,z_Vk> - <z^a_Vj,z^a_Vk>)^2
    in_t = (z_t @ z_t.T - z_t_a @ z_t_a.T).pow(2).sum()  # same for text
    pair = ((z_v * z_t).sum(-1) - (z_v_a * z_t_a).sum(-1)).pow(2).sum()  # matched pairs
    # Sec. 4.3: L^a_GC = 1/N sum_jk [(<z_Vj,z_Vk> - <z^a_Vj,z^a_Vk>)^2 + (same for T)^2]
    #                  + 1/N sum_j (<z_Vj,z_Tj> - <z^a_Vj,z^a_Tj>)^2
    return (in_v + in_t) / n + pair / n


def align_loss(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Sec. 3.1's gap-shrinking term, as a mean squared distance between paired features.

    Args: z_v, z_t (B, E) unit norm. Returns mean_j ||z_Vj - z_Tj||^2 = 2 - 2 mean_j <z_Vj, z_Tj>.
    """
    # DEVIATION: the paper prints L_Align = 1/<Z_T, Z_V>^2, which blows up at orthogonal pairs and
    # rewards <.,.> = -1 as much as +1; ||z_V - z_T||^2 has the intended minimiser z_V = z_T.
    return (z_v - z_t).pow(2).sum(-1).mean()


def modality_gap(z_v: torch.Tensor, z_t: torch.Tensor) -> float:
    """The modality gap we report: mean_j ||z_Vj - z_Tj|| over paired test features (B, E)."""
    return float((z_v - z_t).norm(dim=-1).mean())


def variant_loss(name: str, cfg: Config, f: dict) -> tuple[torch.Tensor, dict]:
    """The full objective of one variant: L_Con + lambda * L_reg (Sec. 4, "Final Loss").

    Args: `f` holds the anchor features z_v, z_t, zi_v, zi_t and the augmented ones z_v_a, z_t_a,
    zi_v_a, zi_t_a, all (B, E). Returns (loss, dict of the parts as floats for logging).
    """
    # DEVIATION: by default the base loss is the symmetric CLIP loss; --inmodal adds the paper's
    # in-modal terms, which on this toy keep most of the image-only bit by themselves.
    aug = (f["z_v_a"], f["z_t_a"]) if cfg.inmodal else (None, None)
    l_con = contrastive_loss(f["z_v"], f["z_t"], *aug, tau=cfg.tau)
    reg = torch.zeros(())
    if name in ("align",):
        reg = reg + cfg.lam_align * align_loss(f["z_v"], f["z_t"])
    if name in ("sep", "all"):
        reg = reg + cfg.lam_sep * sep_loss(f["z_v"], f["zi_v"], f["zi_v_a"], f["z_t"], f["zi_t"],
                                           f["zi_t_a"], cfg.tau, cfg.uni_t, cfg.lam_sep_info)
    if name in ("br", "all"):
        reg = reg + cfg.lam_br * bridge_loss(f["z_v"], f["z_t"], f["z_v_a"], cfg.bridge_t)
    if name in ("gc", "all"):
        reg = reg + cfg.lam_gc * (gc_loss(f["z_v"], f["z_t"])
                                  + gc_aug_loss(f["z_v"], f["z_t"], f["z_v_a"], f["z_t_a"]))
    # PAPER (Sec. 4, Final Loss) [R]: L = L_Con + lambda * L_reg; the lambdas are not in the main
    # text (the appendix was not available), ours were fixed before the runs and not tuned.
    return l_con + reg, {"con": l_con.item(), "reg": reg.item()}


# %% 7. Training
def encode(towers, x_v, x_t, sigma: float, gen: torch.Generator) -> dict:
    """PLUMBING: one noisy view of a batch through both towers. Returns a dict of (B, *) tensors."""
    h_v, z_v, zi_v = towers["v"](x_v + sigma * torch.randn(x_v.shape, generator=gen))
    h_t, z_t, zi_t = towers["t"](x_t + sigma * torch.randn(x_t.shape, generator=gen))
    return {"h_v": h_v, "z_v": z_v, "zi_v": zi_v, "h_t": h_t, "z_t": z_t, "zi_t": zi_t}


def train_variant(name: str, cfg: Config, data: dict, test: dict) -> tuple[dict, dict]:
    """Train fresh towers with one variant's loss.

    Returns (towers, history) where history holds the loss per step and, every `eval_every`
    steps, the probe accuracy and modality gap on the test pairs (the curves of the plot).
    """
    torch.manual_seed(cfg.seed)  # same initial weights for every variant
    towers = nn.ModuleDict({"v": Tower(), "t": Tower()})
    opt = torch.optim.Adam(towers.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches and augmentation noise
    x_v, x_t = torch.from_numpy(data["x_v"]), torch.from_numpy(data["x_t"])  # (N, 32)
    history = {"loss": [], "eval_step": [], "probe_acc": [], "gap": []}
    bar = tqdm(range(cfg.steps), desc=f"{name:>5}", leave=False, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, x_v.shape[0], (cfg.batch,), generator=gen)  # (B,)
        # PAPER: an anchor view and an augmented view of every image and caption.
        # DEVIATION: Gaussian input noise stands in for crop/flip (images) and EDA (text).
        anc = encode(towers, x_v[idx], x_t[idx], cfg.sigma_anchor, gen)
        aug = encode(towers, x_v[idx], x_t[idx], cfg.sigma_aug, gen)
        feats = {**anc, **{k + "_a": v for k, v in aug.items()}}
        loss, parts = variant_loss(name, cfg, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            r = evaluate(towers, cfg, data, test)
            history["eval_step"].append(step + 1)
            history["probe_acc"].append(r["probe_acc"])
            history["gap"].append(r["gap"])
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            probe = history["probe_acc"][-1] if history["probe_acc"] else float("nan")
            bar.write(f"{name:>5} step {step:4d} | loss {history['loss'][-1]:.4f} "
                      f"| con {parts['con']:.4f} | reg {parts['reg']:.4f} | probe {probe:.3f}")
    return towers, history


def train(cfg: Config) -> dict:
    """Train every variant, evaluate, print the table, write summary.json and the plot."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t0 = time.time()
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_data, test_data = make_dataset(cfg, cfg.n_train, rng), make_dataset(cfg, cfg.n_test, rng)
    theory = theorem_gap_terms(toy_pmf())
    print(f"Theorem 3.1 on the toy: Delta_p = {theory['delta_p']:.4f} nats (ln 2); aligned "
          f"features pay >= {theory['excess_ce']:.4f} nats of CE and reach <= "
          f"{theory['aligned_acc_ceiling']:.2f} accuracy on Y; the image alone reaches 1.00.")
    names = cfg.variants.split(",")
    results, histories = {}, {}
    for name in names:
        towers, hist = train_variant(name, cfg, train_data, test_data)
        histories[name] = hist
        results[name] = evaluate(towers, cfg, train_data, test_data)
        r = results[name]
        print(f"{name:>5} done | probe {r['probe_acc']:.3f} | zero-shot {r['zs_acc']:.3f} | "
              f"shifted {r['zs_shift_acc']:.3f} | gap {r['gap']:.3f}")

    print("\n| variant      | probe acc Y | probe CE | zero-shot | zero-shot shifted | gap   |\n"
          "|--------------|-------------|----------|-----------|-------------------|-------|")
    for name in names:
        r = results[name]
        print(f"| {VARIANT_NAMES[name]:<12} | {r['probe_acc']:.3f}       | {r['probe_ce']:.3f}    "
              f"| {r['zs_acc']:.3f}     | {r['zs_shift_acc']:.3f}             | {r['gap']:.3f} |")
    print(f"ceilings: aligned features {theory['aligned_acc_ceiling']:.2f}, image only 1.00")

    metrics = {"delta_p": theory["delta_p"], "aligned_acc_ceiling": theory["aligned_acc_ceiling"]}
    for name in names:
        for k, v in results[name].items():
            metrics[f"{name}/{k}"] = v
        metrics[f"{name}/final_loss"] = histories[name]["loss"][-1]
        # the first checkpoint: the same model before training has aligned it further
        metrics[f"{name}/probe_acc_first_eval"] = histories[name]["probe_acc"][0]
        metrics[f"{name}/gap_first_eval"] = histories[name]["gap"][0]
    summary = {
        "folder": FOLDER,
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "wall_seconds": time.time() - t0,
        "metrics": metrics,
        "headline": headline_rows(results, histories),
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, histories, theory, out / "latent_structure.png")
    summary["wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} and {out / 'latent_structure.png'} "
          f"({summary['wall_seconds']:.1f} s)")
    return {"history": histories, "metrics": metrics, "summary": summary, "results": results}


def headline_rows(results: dict, histories: dict) -> list:
    """PLUMBING: one row per claim (rows whose two variants ran). Each row reads "method beats
    baseline"; in the theorem's rows the *less* aligned model is the method: the forced-alignment
    model is the baseline of the plain CLIP model, and CLIP at its first checkpoint (step
    eval_every) the method against CLIP at the end of training, after alignment has tightened."""
    rows = []
    if "sep" in results and "clip" in results:  # the folder's headline: the first row
        rows.append({"metric": "probe acc on Y (image-only info kept)", "higher_is_better": True,
                     "method": {"name": VARIANT_NAMES["sep"], "value": results["sep"]["probe_acc"]},
                     "baseline": {"name": VARIANT_NAMES["clip"],
                                  "value": results["clip"]["probe_acc"]}})
    if "clip" in results and len(histories["clip"]["probe_acc"]) > 1:
        h = histories["clip"]
        rows.append({"metric": "probe acc on Y as training aligns (Thm 3.1)",
                     "higher_is_better": True,
                     "method": {"name": f"CLIP at step {h['eval_step'][0]}",
                                "value": h["probe_acc"][0]},
                     "baseline": {"name": f"CLIP at step {h['eval_step'][-1]}",
                                  "value": h["probe_acc"][-1]}})
    claims = [  # (metric, key, higher is better, method, baseline)
        ("modality gap (forcing alignment shrinks it)", "gap", False, "align", "clip"),
        ("probe acc on Y (Thm 3.1: alignment costs it)", "probe_acc", True, "clip", "align"),
        ("probe acc on Y", "probe_acc", True, "gc", "clip"),
        ("probe acc on Y", "probe_acc", True, "br", "clip"),
        ("probe acc on Y", "probe_acc", True, "all", "clip"),
        ("zero-shot acc, shifted images", "zs_shift_acc", True, "br", "clip"),
        ("zero-shot acc, shifted images", "zs_shift_acc", True, "gc", "clip"),
        ("zero-shot acc, shifted images", "zs_shift_acc", True, "sep", "clip"),
    ]
    return rows + [{"metric": metric, "higher_is_better": hib,
                    "method": {"name": VARIANT_NAMES[m], "value": results[m][key]},
                    "baseline": {"name": VARIANT_NAMES[b], "value": results[b][key]}}
                   for metric, key, hib, m, b in claims if m in results and b in results]


# %% 8. Evaluation and plot
@torch.no_grad()
def evaluate(towers, cfg: Config, train_data: dict, test_data: dict) -> dict:
    """Linear probe of the frozen image backbone for Y, zero-shot c by text prototypes (clean and
    shifted), and the modality gap, all on held-out pairs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def feats(d, sigma, seed):
        g = torch.Generator().manual_seed(seed)
        return encode(towers, torch.from_numpy(d["x_v"]), torch.from_numpy(d["x_t"]), sigma, g)

    tr, te = feats(train_data, 0.0, 0), feats(test_data, 0.0, 0)
    shifted = feats(test_data, cfg.sigma_shift, cfg.seed + 2)
    # PAPER (Sec. 5, linear probing): a logistic regression on the frozen image features; we probe
    # the backbone h for every variant, so Sep is not credited for its extra head's dimensions.
    scaler = StandardScaler().fit(tr["h_v"].numpy())
    probe = LogisticRegression(max_iter=2000, random_state=cfg.seed)
    probe.fit(scaler.transform(tr["h_v"].numpy()), train_data["y"])
    x_te = scaler.transform(te["h_v"].numpy())
    probe_acc = float((probe.predict(x_te) == test_data["y"]).mean())
    p_true = probe.predict_proba(x_te)[np.arange(len(x_te)), test_data["y"]]
    probe_ce = float(-np.log(np.clip(p_true, 1e-12, None)).mean())
    # PAPER (Sec. 5, zero-shot): a class "prompt" embedding = the mean text feature of the class.
    c_tr = torch.from_numpy(train_data["c"])
    protos = torch.stack([tr["z_t"][c_tr == k].mean(0) for k in range(N_CLASS)])  # (4, E)
    protos = F.normalize(protos, dim=-1)  # (4, E)
    c_te = torch.from_numpy(test_data["c"])
    zs = float(((te["z_v"] @ protos.T).argmax(1) == c_te).float().mean())
    zs_shift = float(((shifted["z_v"] @ protos.T).argmax(1) == c_te).float().mean())
    return {"probe_acc": probe_acc, "probe_ce": probe_ce, "zs_acc": zs, "zs_shift_acc": zs_shift,
            "gap": modality_gap(te["z_v"], te["z_t"])}


def plot(results: dict, histories: dict, theory: dict, path: Path) -> None:
    """Four panels: (1) final probe accuracy per variant with the two ceilings; (2) probe
    accuracy against the modality gap along training (one line per variant, big dot = end);
    (3) probe accuracy against training step; (4) zero-shot accuracy on clean and shifted images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = [VARIANT_NAMES[n] for n in names]
    colors = {n: f"C{i}" for i, n in enumerate(VARIANTS)}
    ceil = theory["aligned_acc_ceiling"]
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    ax[0].bar(labels, [results[n]["probe_acc"] for n in names], color=[colors[n] for n in names])
    ax[0].axhline(ceil, ls="--", color="k", label="ceiling for aligned features (Thm 3.1)")
    ax[0].axhline(1.0, ls=":", color="k", label="image-only ceiling")
    ax[0].set_ylim(0, 1.05)
    ax[0].set_ylabel("linear-probe accuracy on Y (8-way)")
    ax[0].legend(fontsize=7, loc="lower right")
    ax[0].tick_params(axis="x", rotation=30)
    for n in names:
        h = histories[n]
        ax[1].plot(h["gap"], h["probe_acc"], "-o", ms=3, color=colors[n], label=VARIANT_NAMES[n])
        ax[1].plot(h["gap"][-1], h["probe_acc"][-1], "o", ms=9, color=colors[n])
        ax[2].plot(h["eval_step"], h["probe_acc"], "-o", ms=3, color=colors[n],
                   label=VARIANT_NAMES[n])
    for a in ax[1:3]:
        a.axhline(ceil, ls="--", color="k")
        a.set_ylabel("probe accuracy on Y")
        a.set_ylim(0.45, 1.02)
    ax[1].set_xlabel("modality gap  mean ||z_V - z_T||  (big dot = end of training)")
    ax[1].legend(fontsize=7)
    ax[2].set_xlabel("training step")
    x = np.arange(len(names))
    ax[3].bar(x - 0.2, [results[n]["zs_acc"] for n in names], 0.4, label="clean", color="0.6")
    ax[3].bar(x + 0.2, [results[n]["zs_shift_acc"] for n in names], 0.4, label="shifted",
              color="tab:purple")
    ax[3].set_xticks(x, labels, rotation=30)
    ax[3].set_ylim(0.5, 1.02)
    ax[3].set_ylabel("zero-shot accuracy on c (text prototypes)")
    ax[3].legend(fontsize=7)
    fig.suptitle("Latent modality structures in miniature (one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# %% 9. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest and fair to a shared machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return train(cfg)


if __name__ == "__main__":
    main()
