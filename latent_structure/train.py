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
two small towers per arm: the paper's base loss L_Con alone, with stronger augmentation (the
rival), and with each regulariser (Sep, Br, GC); plain CLIP alone is the floor. Then we
linear-probe the frozen image backbone h and the shared image feature z for Y, classify c
zero-shot with text prototypes on clean images, on images seen through a changed sensor (the
distribution shift, a family no arm trained on) and on noisier images (the augmentation's own
family), and measure retrieval and the modality gap. Each arm's learning rate and length were
chosen on the tuning seeds. The mixing matrices of the toy's 'sensors' change with --seed.

Reading map (the paper is section 3; read it first, next to the paper):
    information_gap, theorem_gap_terms (Thm 3.1)             section 3, The paper: the theory
    Tower (shared head P -> z, Sep's independent head Q -> z^i)
    info_nce -> contrastive_loss (Sec. 4, the base loss L_Con)
    ortho_loss, indep_contrastive_loss, uniformity_loss -> sep_loss      (Sec. 4.1, Sep)
    bridge_mean (Eq. 1) -> bridge_loss                                   (Sec. 4.2, Br)
    gc_loss, gc_aug_loss                                                 (Sec. 4.3, GC)
    align_loss, modality_gap                                  (Sec. 3.1, forced alignment)
    variant_loss: L = L_Con + lambda * L_reg, the objective of every compared arm
    the `Try it` cell                                         runs them on hand-made vectors
    toy_pmf, make_dataset, sensor_shift (the premise)          section 4
    arm_sigma_aug, arm_budget, arm_record (what each arm gets) section 5
    make_views -> train_variant -> evaluate -> train -> report    section 6
    budget_curves, choose_budgets (how TUNED was chosen)       section 6
    paired_intervals (how the README reads a close headline)  section 6
    A first read may skip Config's knobs (section 2), the plots, and the Appendix (run plumbing,
    the same bytes in every folder).

Notation (paper -> code):
    X_V, X_T          x_v, x_t        image / text inputs, (N, D_in)
    Z_V, Z_T          z_v, z_t        shared (aligned) features, unit norm, (B, E)
    Z^a_V, Z^a_T      z_v_a, z_t_a    features of the augmented view, (B, E)
    Z^i_V, Z^i_T      zi_v, zi_t      independent features of Sep, unit norm, (B, E)
    h                 h_v             image backbone output (what the probe reads), (B, H)
    tau               tau             temperature of InfoNCE
    t (bridge)        bridge_t        position on the Brownian bridge, 0.25 in the paper
    t (uniformity)    uni_t           Gaussian-potential scale, 2 in the paper
    Delta_p           information_gap(pmf)
    Y                 y = 2c + a      downstream target (8 classes)
Dimensions: N examples, B batch, D_in input width (32), H backbone width (16), E embedding (16).

What the miniature leaves out: synthetic vectors instead of images and captions, 2-layer MLP
towers instead of ResNet-50/BERT, Gaussian input noise instead of crop/flip/EDA, 4,000 pairs
instead of CC3M, a handful of seconds of Adam per variant, a fixed temperature, and no ALBEF
fusion experiments.

Run:   python latent_structure/train.py          (six arms, one seed, under a minute of CPU)
Ends:  the premise rows, a table `variant | probe h | probe z | probe CE | zero-shot | sensor
       shift | noise | R@1 | gap`, zero-shot along the shift dial, the base-loss x regulariser
       tables, then one verdict line per headline row and the files written.
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
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FOLDER = "latent_structure"
# PLUMBING: inside Jupyter, sys.argv holds the kernel's arguments and figures show inline; the
# `Try it` cells run only there.
IN_NOTEBOOK = "ipykernel" in sys.modules

# PLUMBING: two base losses x (no regulariser, Sep, Br, GC), the paper's base loss with stronger
# augmentation (the rival for robustness), the forced alignment of Sec. 3.1, and all three
# regularisers together. A name "im_<reg>" puts <reg> on the paper's base loss.
VARIANTS = ("clip", "sep", "br", "gc", "im", "im_aug", "im_sep", "im_br", "im_gc", "align",
            "all")
DEFAULT_VARIANTS = ("clip", "im", "im_aug", "im_sep", "im_br", "im_gc")
VARIANT_NAMES = {"clip": "CLIP", "sep": "CLIP + Sep", "br": "CLIP + Br", "gc": "CLIP + GC",
                 "im": "CLIP + in-modal", "im_aug": "CLIP + in-modal, strong aug",
                 "im_sep": "CLIP + in-modal + Sep", "im_br": "CLIP + in-modal + Br",
                 "im_gc": "CLIP + in-modal + GC", "align": "CLIP + Align",
                 "all": "CLIP + Sep+Br+GC"}
# PLUMBING: one colour per arm, the same in every figure.
ARM_COLORS = {n: f"C{i}" for i, n in enumerate(VARIANTS)}
# PLUMBING: the sensor shift's strengths rho (0 = the training sensor); SHIFT_RHO is the headline.
SHIFT_DIAL, SHIFT_RHO = (0.25, 0.5, 0.75), 0.5
HEAD_KEY = f"zs_sensor{SHIFT_RHO}"  # the headline metric's key in each arm's evaluation
# PLUMBING: the toy's fixed sizes (section 4 explains them; the towers' defaults read D_IN).
N_CLASS, D_CONTENT, D_NOISE, D_IN = 4, 6, 4, 32
D_LATENT = N_CLASS + D_CONTENT + 1 + D_NOISE  # 15 = one-hot c, s, the private bit, nuisance


def split_variant(name: str) -> tuple[bool, str]:
    """PLUMBING: "im_gc" -> (True, "gc"): (in-modal base loss?, regulariser or "" for none)."""
    inmodal = name == "im" or name.startswith("im_")
    reg = name[3:] if name.startswith("im_") else ("" if name in ("im", "clip") else name)
    return inmodal, ("" if reg == "aug" else reg)


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
    steps: int = field(default=3000, metadata={
        "help": "most Adam steps per arm (with --budget tuned an arm stops earlier at its tuned "
                "length)", "range": "[1, inf)"})  # paper: 64 epochs
    budget: str = field(default="tuned", metadata={
        "help": "tuned: each arm's lr and steps from TUNED (chosen on seeds 100-102); shared: "
                "every arm gets --lr and --steps (the tuning sweeps)",
        "choices": ("tuned", "shared")})
    variants: str = field(default=",".join(DEFAULT_VARIANTS),
                          metadata={"help": "comma-separated subset of " + ",".join(VARIANTS)})
    data_seed: int = field(default=-1, metadata={
        "help": "seed of the mixing matrices (the toy's 'sensors'); -1 = the same as --seed",
        "range": "[-1, 4294967295]"})
    n_train: int = field(default=4000, metadata={"help": "training pairs",
                                                 "range": "[1, inf)"})  # paper: CC3M
    n_test: int = field(default=2000, metadata={"help": "test pairs", "range": "[1, inf)"})
    batch: int = field(default=128, metadata={"help": "batch size N (InfoNCE needs negatives)",
                                              "range": "[2, inf)"})  # paper: 128 (CyCLIP)
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate with --budget shared",
                                              "range": "(0, inf)"})  # paper: 5e-4 AdamW
    # DEVIATION: a fixed temperature; CyCLIP learns the logit scale (clamped at 100).
    tau: float = field(default=0.1, metadata={"help": "InfoNCE temperature",
                                              "range": "(0, inf)"})  # paper: learned
    lam_sep: float = field(default=1.0, metadata={"help": "weight of L_Sep [R]",
                                                  "range": "[0, inf)"})
    lam_sep_info: float = field(default=1.0, metadata={
        "help": "weight of L^i_Con + L^i_Uni inside L_Sep (paper: 1)", "range": "[0, inf)"})
    lam_br: float = field(default=1.0, metadata={"help": "weight of L_Br [R]",
                                                 "range": "[0, inf)"})
    lam_gc: float = field(default=0.25, metadata={
        "help": "weight of L_GC + L^a_GC (CyCLIP's recommended cyclic weight)",
        "range": "[0, inf)"})
    lam_align: float = field(default=5.0, metadata={"help": "weight of the forced alignment",
                                                    "range": "[0, inf)"})
    bridge_t: float = field(default=0.25, metadata={"help": "Brownian-bridge position t",
                                                    "range": "[0, 1]"})
    uni_t: float = field(default=2.0, metadata={"help": "uniformity potential scale t",
                                                "range": "[0, inf)"})
    sigma_anchor: float = field(default=0.05, metadata={"help": "input noise of the anchor view",
                                                        "range": "[0, inf)"})
    sigma_aug: float = field(default=0.15, metadata={"help": "input noise of the augmented view",
                                                     "range": "[0, inf)"})
    sigma_strong: float = field(default=0.5, metadata={
        "help": "input noise of the augmented view of the rival im_aug (stronger augmentation; "
                "0.5 chosen from 0.3, 0.5, 0.8 on the tuning seeds)",
        "range": "[0, inf)"})
    sigma_shift: float = field(default=0.5, metadata={
        "help": "input noise of the noise-shifted test images", "range": "[0, inf)"})
    log_every: int = field(default=300, metadata={"help": "steps between log lines",
                                                   "range": "[1, inf)"})
    eval_every: int = field(default=500, metadata={
        "help": "steps between probe/gap checkpoints (the curves in the plot)",
        "range": "[1, inf)"})
    paired_from: str = field(default="", metadata={
        "help": "instead of training: read the runs under this folder (seed*/summary.json, e.g. "
                "runs/run_all/latent_structure) and print each claim row's paired difference "
                "with its 95-percent t-interval over the seeds"})
    curves_from: str = field(default="", metadata={
        "help": "instead of training: read the tuning runs under this folder (runs/tune), plot "
                "each arm's metric against steps and print each arm's best lr and steps"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=40, n_train=400, n_test=300, log_every=20, eval_every=20,
             variants="clip,im,im_aug,im_gc")

# Each arm's learning rate and training length, chosen on the tuning seeds 100-102: the point of
# its budget curve (lr x checkpoint, every 250 steps) with the best mean headline metric
# (zero-shot accuracy under the sensor shift). `--curves-from runs/tune` recomputes this table
# from the sweeps (README, Run); every default arm had lr 3e-4, 1e-3 and 3e-3, and grids were
# extended where a choice sat at an edge (none is left at one; the base loss `im` also had 1e-4).
# Arms outside the default run were not swept this round: `sep`
# keeps its first-round choice (1e-3, 2,000 steps, the last checkpoint of that sweep); br, gc,
# align and all get 1e-3 and 1,500 steps.
TUNED = {name: {"lr": 1e-3, "steps": 1500} for name in VARIANTS}
TUNED.update({"clip": {"lr": 1e-3, "steps": 750}, "sep": {"lr": 1e-3, "steps": 2000},
              "im": {"lr": 3e-4, "steps": 2750}, "im_aug": {"lr": 1e-3, "steps": 2000},
              "im_sep": {"lr": 1e-3, "steps": 3000}, "im_br": {"lr": 1e-3, "steps": 750},
              "im_gc": {"lr": 3e-2, "steps": 750}})


def check_config(cfg: Config) -> str | None:
    """PLUMBING: rules the per-field ranges cannot say (the Appendix checks each field's own)."""
    bad = [v for v in cfg.variants.split(",") if v not in VARIANTS]
    if bad or not cfg.variants:
        return f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}"
    return None


# %% 3. The paper: Theorem 3.1, the base loss and the three latent structures
# PAPER: Theorem 3.1 first. It compares the best cross-entropy on Y from exactly aligned features
# with the best from the raw inputs; the difference is at least the information gap Delta_p. We
# evaluate both sides exactly on the toy's discrete latents (section 4 draws the data from them).
def _cond_entropy(pmf: np.ndarray, given, target) -> float:
    """PAPER: H(target | given) in nats, for functions given(c, a, b), target(c, a, b) of the
    discrete latents, from their joint pmf (4, 2, 2)."""
    joint, marg = {}, {}
    for (c, a, b), p in np.ndenumerate(pmf):
        if p == 0:
            continue
        g, y = given(c, a, b), target(c, a, b)
        joint[(g, y)] = joint.get((g, y), 0.0) + p
        marg[g] = marg.get(g, 0.0) + p
    return float(-sum(p * math.log(p / marg[g]) for (g, _), p in joint.items()))


# PAPER: what each modality knows about Y in our toy. X_V is an injective map of (c, s, a, noise)
# and X_T of (c, s, b, noise); s and the noise are independent of Y, so X_V carries exactly (c, a)
# about Y and X_T exactly (c, b).
def _y(c, a, b):
    """PAPER: the downstream target Y = 2c + a (it needs the image-only bit a)."""
    return 2 * c + a


def _x_v(c, a, b):
    """PAPER: what X_V tells about Y: (c, a)."""
    return (c, a)


def _x_t(c, a, b):
    """PAPER: what X_T tells about Y: (c, b)."""
    return (c, b)


def information_gap(pmf: np.ndarray) -> float:
    """PAPER: Theorem 3.1's Delta_p = |I(X_T; Y) - I(X_V; Y)| in nats, from the latent pmf
    (4, 2, 2)."""
    h_y = _cond_entropy(pmf, lambda c, a, b: 0, _y)  # H(Y)
    # PAPER: I(X;Y) = H(Y) - H(Y|X), for X = X_T and X = X_V.
    i_t = h_y - _cond_entropy(pmf, _x_t, _y)
    i_v = h_y - _cond_entropy(pmf, _x_v, _y)
    # Theorem 3.1: Delta_p := |I(X_T; Y) - I(X_V; Y)|
    return abs(i_t - i_v)


def theorem_gap_terms(pmf: np.ndarray) -> dict:
    """PAPER: both sides of Theorem 3.1 for the best perfectly aligned feature Z = c (all that
    the two modalities share).

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


# PAPER: the two-tower model. Each modality has a backbone h and a shared projection head P whose
# unit-norm output z is what contrastive learning aligns; Sep (Sec. 4.1) adds an independent head
# Q whose output z^i holds what is specific to the modality.
class Tower(nn.Module):
    """PAPER: one modality's encoder: backbone h (the features the linear probe reads), a shared
    projection head P (gives z) and Sep's extra independent head Q (gives z^i)."""

    def __init__(self, d_in: int = D_IN, d_hidden: int = 64, d_h: int = 16, d_emb: int = 16):
        super().__init__()
        # DEVIATION: a 2-layer MLP stands in for ResNet-50 (images) and BERT (text).
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


def info_nce(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """PAPER: one direction of InfoNCE: row j of q must pick k_j among all k.

    Args: q (B, E), k (B, E) unit norm; tau > 0. Returns a scalar.
    """
    # PAPER (Sec. 4): L_Q2K = -1/N sum_j log exp(<q_j,k_j>/tau) / sum_k exp(<q_j,k_k>/tau)
    logits = q @ k.T / tau  # (B, B)
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def contrastive_loss(z_v, z_t, z_v_a=None, z_t_a=None, tau: float = 0.1) -> torch.Tensor:
    """PAPER: the base loss. Without augmented views: the symmetric CLIP loss
    (L_V2T + L_T2V) / 2. With them: the paper's L_Con = 1/4 (L_V2T + L_T2V + L_V2V + L_T2T).

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
    """PAPER: Sec. 4.1 L_Ortho: independent features must be orthogonal to the shared ones.

    Args: all (B, E) unit norm. Returns a scalar (0 when every z^i is orthogonal to its z).
    """
    # Sec. 4.1: L_Ortho = 1/N sum_j (<z_Vj, z^i_Vj>^2 + <z_Tj, z^i_Tj>^2)
    return ((z_v * zi_v).sum(-1) ** 2 + (z_t * zi_t).sum(-1) ** 2).mean()


def indep_contrastive_loss(zi_v, zi_v_a, zi_t, zi_t_a, tau: float) -> torch.Tensor:
    """PAPER: Sec. 4.1 L^i_Con = L^i_V2V + L^i_T2T: in-modal InfoNCE on the independent features.

    Args: (B, E) unit norm independent features of the anchor and augmented views.
    """
    # PAPER: the printed numerator <z^i_Vj, z^i_Vj> is identically 1 (a typo); the positive must
    # be the independent feature of the augmented view, and the denominator runs over that batch.
    # Sec. 4.1: L^i_Con = L^i_V2V + L^i_T2T
    return info_nce(zi_v, zi_v_a, tau) + info_nce(zi_t, zi_t_a, tau)


def uniformity_loss(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """PAPER [R]: Wang & Isola's uniformity for one modality: log mean_{j != k} G_t(z_j, z_k).

    Args: z (B, E) unit norm, t > 0. Returns a scalar; lower means more spread out.
    """
    # BEGIN SOLUTION (exercise 3)
    # Exercise 3: compute the uniformity loss log mean_{j != k} exp(-t ||z_j - z_k||^2).
    # Hint: leave out the diagonal j = k (each term there is exp(0) = 1).
    # torch.pdist lists each pair j < k once; the mean over j != k is the same (symmetric).
    sq = torch.pdist(z).pow(2)  # (B (B - 1) / 2,) squared distances
    # Sec. 4.1 [R]: G_t(u, v) = exp(-t ||u - v||^2), averaged over the pairs j != k, in the log.
    loss = torch.log(torch.exp(-t * sq).mean())
    # END SOLUTION
    return loss


def sep_loss(z_v, zi_v, zi_v_a, z_t, zi_t, zi_t_a, tau: float, uni_t: float = 2.0,
             info_weight: float = 1.0) -> torch.Tensor:
    """PAPER: Sec. 4.1 L_Sep = L_Ortho + L^i_Con + L^i_Uni (deep feature separation).

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
    """PAPER: Eq. (1)'s mean: mu(Z_V, Z_T, t) = (t Z_V + (1-t) Z_T) / ||t Z_V + (1-t) Z_T||.

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
    """PAPER: Sec. 4.2 L_Br: the augmented image must lie at the bridge mean between image and
    text.

    Args: z_v, z_t, z_v_a (B, E) unit norm; t the bridge position. Returns a scalar.
    Maximum likelihood under Eq. (1)'s fixed variance t(1-t) I is this mean squared error.
    """
    mu = bridge_mean(z_v, z_t, t)  # (B, E)
    # Sec. 4.2: L_Br = 1/N sum_j ||z^a_Vj - mu(z_Vj, z_Tj, t)||^2
    # (the paper's printed second line drops the `2 - 2 *` and the square root; we use line one)
    return (z_v_a - mu).pow(2).sum(-1).mean()


def gc_loss(z_v: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """PAPER: Sec. 4.3 L_GC: cross-modal symmetry plus in-modal consistency (CyCLIP's two cyclic
    terms).

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
    """PAPER: Sec. 4.3 L^a_GC: the similarity geometry must survive augmentation.

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
    """PAPER: Sec. 3.1's gap-shrinking term, as a mean squared distance between paired features.

    Args: z_v, z_t (B, E) unit norm. Returns mean_j ||z_Vj - z_Tj||^2 = 2 - 2 mean_j <z_Vj, z_Tj>.
    """
    # DEVIATION: the paper prints L_Align = 1/<Z_T, Z_V>^2, which blows up at orthogonal pairs and
    # rewards <.,.> = -1 as much as +1; ||z_V - z_T||^2 has the intended minimiser z_V = z_T.
    return (z_v - z_t).pow(2).sum(-1).mean()


def modality_gap(z_v: torch.Tensor, z_t: torch.Tensor) -> float:
    """PAPER (Sec. 3.1): the modality gap we report: mean_j ||z_Vj - z_Tj|| over paired test
    features (B, E)."""
    return float((z_v - z_t).norm(dim=-1).mean())


def variant_loss(name: str, cfg: Config, f: dict) -> tuple[torch.Tensor, dict]:
    """PAPER: the full objective of one variant: L_Con + lambda * L_reg (Sec. 4, "Final Loss").

    Args: `f` holds the anchor features z_v, z_t, zi_v, zi_t and the augmented ones z_v_a, z_t_a,
    zi_v_a, zi_t_a, all (B, E). Returns (loss, dict of the parts as floats for logging).
    """
    # PAPER (Sec. 4): the paper's base loss L_Con has the in-modal terms ("im_*" variants). We
    # also train every regulariser on the plain symmetric CLIP loss (L_V2T + L_T2V) / 2, because
    # on this toy the in-modal terms alone keep most of the image-only bit: the two rows of the
    # table show which structure carries which benefit.
    inmodal, reg_name = split_variant(name)
    aug = (f["z_v_a"], f["z_t_a"]) if inmodal else (None, None)
    l_con = contrastive_loss(f["z_v"], f["z_t"], *aug, tau=cfg.tau)
    reg = torch.zeros(())
    if reg_name == "align":
        reg = reg + cfg.lam_align * align_loss(f["z_v"], f["z_t"])
    if reg_name in ("sep", "all"):
        reg = reg + cfg.lam_sep * sep_loss(f["z_v"], f["zi_v"], f["zi_v_a"], f["z_t"], f["zi_t"],
                                           f["zi_t_a"], cfg.tau, cfg.uni_t, cfg.lam_sep_info)
    if reg_name in ("br", "all"):
        reg = reg + cfg.lam_br * bridge_loss(f["z_v"], f["z_t"], f["z_v_a"], cfg.bridge_t)
    if reg_name in ("gc", "all"):
        reg = reg + cfg.lam_gc * (gc_loss(f["z_v"], f["z_t"])
                                  + gc_aug_loss(f["z_v"], f["z_t"], f["z_v_a"], f["z_t_a"]))
    # PAPER (Sec. 4, Final Loss) [R]: L = L_Con + lambda * L_reg; the lambdas are not in the main
    # text (the appendix was not available). lambda_GC = 0.25 is CyCLIP's recommended weight for
    # its cyclic terms (verified); lambda_Sep = lambda_Br = 1 and lambda_Align = 5 are ours, fixed
    # before the runs and not tuned.
    return l_con + reg, {"con": l_con.item(), "reg": reg.item()}


# %% Try it: the bridge, GC and the information gap on hand-made vectors (runs only in a notebook)
if IN_NOTEBOOK:
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # (1, 2) each
    for t_try in (1.0, 0.25, 0.0):  # t = 1 is the image, t = 0 the text
        print(f"bridge mean at t = {t_try}: {bridge_mean(e1, e2, t_try).tolist()}")
    z_try = torch.eye(2)  # (2, 2): two image features
    swap, rot90 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    print(f"L_GC when the text features are the images swapped: {gc_loss(z_try, z_try @ swap):.3f}"
          f"; rotated by 90 degrees: {gc_loss(z_try, z_try @ rot90):.3f}")
    pmf_try = np.full((4, 2, 2), 1.0 / 16)  # (c, a, b) uniform, as in the toy
    print(f"Delta_p of the toy: {information_gap(pmf_try):.4f} nats (ln 2 = {math.log(2):.4f})")


# %% 4. The toy world and its premise
def set_seed(seed: int) -> None:
    """PLUMBING: seed random, numpy and torch; sklearn gets random_state=seed explicitly."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def toy_pmf() -> np.ndarray:
    """The exact joint pmf of the discrete latents (c, a, b), shape (4, 2, 2): all uniform."""
    return np.full((N_CLASS, 2, 2), 1.0 / (N_CLASS * 4))


def make_dataset(cfg: Config, n: int, rng: np.random.Generator, shift_rhos=()) -> dict:
    """Draw n image-text pairs. Returns float32 arrays x_v, x_t (n, 32) and ints c, a, b, y (n,).

    The mixing matrices (how each modality's 'sensor' sees the latents) come from `data_seed`,
    which is --seed unless set, so the seed spread also varies the data generator; the samples
    follow `rng`. Delta_p does not depend on the mixing (it is ln 2 for every seed).
    For each rho in `shift_rhos`, "x_v_sensor"[rho] (n, 32) shows the *same* latents through a
    changed image sensor (the distribution shift of the headline; see `sensor_shift`).
    """
    # DEVIATION: synthetic vectors with known latents instead of CC3M images and captions, so
    # that Delta_p is known exactly.
    # PLUMBING: a stream of its own (the seed plus a tag), so the mixing matrices are not drawn
    # from the same random numbers as the samples when data_seed == seed.
    mix = np.random.default_rng([cfg.data_seed if cfg.data_seed >= 0 else cfg.seed, 7])
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
    sensor = {rho: np.tanh(lat_v @ sensor_shift(w_v, rho, cfg)).astype(np.float32)  # (n, 32)
              for rho in shift_rhos}
    return {"x_v": x_v, "x_t": x_t, "c": c, "a": a, "b": b, "y": 2 * c + a, "x_v_sensor": sensor}


def sensor_shift(w_v: np.ndarray, rho: float, cfg: Config) -> np.ndarray:
    """The image sensor at test time: W_V' = sqrt(1 - rho^2) W_V + rho W_new, (15, 32).

    DEVIATION: the paper's shifts are ImageNet-V2/Sketch/A/R, the same classes rendered another
    way. Ours renders the same latents (class, content, private bit, nuisance) through a partly new
    mixing: a different family from the training augmentation (input noise), which no arm saw.
    W_new has W_V's scale and its own random stream, so every rho shares one direction of change.
    """
    new = np.random.default_rng([cfg.data_seed if cfg.data_seed >= 0 else cfg.seed, 8])
    w_new = new.normal(size=w_v.shape) / math.sqrt(D_LATENT)  # (15, 32)
    return math.sqrt(1.0 - rho**2) * w_v + rho * w_new


# %% 5. Baselines and rivals: what each compared arm gets
# PLUMBING: every arm is a variant of `variant_loss` (section 3): the plain CLIP loss and the
# paper's base loss L_Con are the baselines; each regulariser is added on top of one of them.
# The rival a reviewer asks for first: the paper's base loss with *stronger augmentation*
# (`im_aug`: its augmented view gets sigma_strong instead of sigma_aug). GC's L^a_GC and Br's
# bridge act through the augmented view, so robustness they bring might come from augmentation
# alone; this arm gets the same towers, batches and tuning effort, and no regulariser.
def arm_sigma_aug(name: str, cfg: Config) -> float:
    """The input noise of an arm's augmented view: sigma_strong for the rival, else sigma_aug."""
    return cfg.sigma_strong if name == "im_aug" else cfg.sigma_aug


def arm_budget(name: str, cfg: Config) -> tuple[float, int]:
    """An arm's (learning rate, steps): its tuned pair (capped at --steps), or --lr, --steps."""
    if cfg.budget == "shared":
        return cfg.lr, cfg.steps
    return TUNED[name]["lr"], min(TUNED[name]["steps"], cfg.steps)


def arm_record(name: str, cfg: Config) -> dict:
    """What one arm trained on, from what, for how long (EXPERIMENTS.md, section 7)."""
    inmodal, reg = split_variant(name)
    lam = {"sep": cfg.lam_sep, "br": cfg.lam_br, "gc": cfg.lam_gc, "align": cfg.lam_align}
    lr, steps = arm_budget(name, cfg)
    return {"data": f"train pairs (n={cfg.n_train}, data seed "
                    f"{cfg.data_seed if cfg.data_seed >= 0 else cfg.seed}), batches from "
                    f"generator seed {cfg.seed + 1}",
            "init": f"torch seed {cfg.seed} (the same towers for every arm)",
            "steps": steps, "lr": lr, "batch": cfg.batch,
            "chosen_on": (f"tuning seeds 100-102, mean {HEAD_KEY} (lr x checkpoint)"
                          if cfg.budget == "tuned" else "shared --lr and --steps"),
            "base_loss": "L_Con (cross + in-modal)" if inmodal else "CLIP (cross only)",
            "regulariser": reg or "none",
            "lam": (lam.get(reg, 0.0) if reg != "all"
                    else {k: lam[k] for k in ("sep", "br", "gc")}),
            "sigma_anchor": cfg.sigma_anchor, "sigma_aug": arm_sigma_aug(name, cfg),
            "eval": "frozen towers; probes on train features, zero-shot prototypes from train "
                    "texts, scored on test pairs"}


# %% 6. Training and the report
def encode(towers, x_v, x_t, sigma: float, gen: torch.Generator) -> dict:
    """PLUMBING: one noisy view of a batch through both towers. Returns a dict of (B, *) tensors."""
    h_v, z_v, zi_v = towers["v"](x_v + sigma * torch.randn(x_v.shape, generator=gen))
    h_t, z_t, zi_t = towers["t"](x_t + sigma * torch.randn(x_t.shape, generator=gen))
    return {"h_v": h_v, "z_v": z_v, "zi_v": zi_v, "h_t": h_t, "z_t": z_t, "zi_t": zi_t}


def make_views(towers, x_v, x_t, cfg: Config, gen: torch.Generator,
               sigma_aug: float | None = None) -> dict:
    """An anchor view (noise sigma_anchor) and an augmented view (noise sigma_aug, or the given
    `sigma_aug`: the rival's stronger augmentation) of a batch.

    Args: x_v, x_t (B, D_in). Returns the anchor features under their names (z_v, zi_v, ...) and
    the augmented view's under the same names with "_a" (z_v_a, zi_v_a, ...), all (B, *).
    """
    # PAPER: an anchor view and an augmented view of every image and caption.
    # DEVIATION: Gaussian input noise stands in for crop/flip (images) and EDA (text).
    s_aug = cfg.sigma_aug if sigma_aug is None else sigma_aug
    noise = [torch.randn(x.shape, generator=gen) for x in (x_v, x_t, x_v, x_t)]  # 4 x (B, D_in)
    # PLUMBING: both views of a modality go through its tower as one (2B, D_in) batch (faster).
    views_v = torch.cat([x_v + cfg.sigma_anchor * noise[0], x_v + s_aug * noise[2]])  # (2B, D)
    views_t = torch.cat([x_t + cfg.sigma_anchor * noise[1], x_t + s_aug * noise[3]])  # (2B, D)
    f = {}
    for m, views in (("v", views_v), ("t", views_t)):
        for k, out in zip(("h", "z", "zi"), towers[m](views)):  # each (2B, *)
            f[f"{k}_{m}"], f[f"{k}_{m}_a"] = out.chunk(2)  # (B, *) anchor, (B, *) augmented
    return f


def train_variant(name: str, cfg: Config, data: dict, test: dict) -> tuple[dict, dict, dict]:
    """Train fresh towers with one variant's loss, at the arm's own lr and length (`arm_budget`).

    Returns (towers, history, final evaluation) where history holds the loss per step and, every
    `eval_every` steps, the evaluation's numbers on the test pairs (the curves of the plots).
    """
    lr, steps = arm_budget(name, cfg)
    torch.manual_seed(cfg.seed)  # same initial weights for every variant
    towers = nn.ModuleDict({"v": Tower(), "t": Tower()})
    opt = torch.optim.Adam(towers.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches and augmentation noise
    x_v, x_t = torch.from_numpy(data["x_v"]), torch.from_numpy(data["x_t"])  # (N, 32)
    history = {"loss": [], "eval_step": []}
    bar = tqdm(range(steps), desc=f"{name:>6}", leave=False, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, x_v.shape[0], (cfg.batch,), generator=gen)  # (B,)
        feats = make_views(towers, x_v[idx], x_t[idx], cfg, gen, arm_sigma_aug(name, cfg))
        loss, parts = variant_loss(name, cfg, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step == steps - 1:
            r = evaluate(towers, cfg, data, test)
            history["eval_step"].append(step + 1)
            for k, v in r.items():
                history.setdefault(k, []).append(v)
        if step % cfg.log_every == 0 or step == steps - 1:
            probe = history["probe_acc"][-1] if "probe_acc" in history else float("nan")
            bar.write(f"{name:>6} step {step:4d} | loss {history['loss'][-1]:.4f} "
                      f"| con {parts['con']:.4f} | reg {parts['reg']:.4f} | probe {probe:.3f}")
    return towers, history, r  # the last step always evaluates, so r is the final evaluation



def class_prototypes(z_t: torch.Tensor, c: torch.Tensor, n_class: int = N_CLASS) -> torch.Tensor:
    """Zero-shot class "prompts": the mean *text* feature of each class, re-normalised.

    Args: z_t (N, E) text features of the training pairs; c (N,) their classes.
    Returns (n_class, E), unit rows.
    """
    protos = torch.stack([z_t[c == k].mean(0) for k in range(n_class)])  # (C, E)
    return F.normalize(protos, dim=-1)  # (C, E)


def _probe(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, seed: int):
    """PLUMBING: a standardised logistic regression. Returns (accuracy, cross-entropy)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    # PLUMBING: trained features converge in about 25 iterations; the cap (sklearn's default)
    # bounds the cost of --quick's barely trained ones, whose warning we silence.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = LogisticRegression(max_iter=100, random_state=seed).fit(scaler.transform(x_tr),
                                                                         y_tr)
    x_te = scaler.transform(x_te)
    acc = float((probe.predict(x_te) == y_te).mean())
    p_true = probe.predict_proba(x_te)[np.arange(len(x_te)), y_te]
    return acc, float(-np.log(np.clip(p_true, 1e-12, None)).mean())


@torch.no_grad()
def evaluate(towers, cfg: Config, train_data: dict, test_data: dict) -> dict:
    """Linear probes of the frozen image backbone h and of the shared image feature z for Y,
    zero-shot c by prototypes of the *training* texts (on clean, noisier and sensor-shifted test
    images), image->text R@1 and the modality gap, all scored on the held-out test pairs."""

    def feats(d, sigma, seed):
        g = torch.Generator().manual_seed(seed)
        return encode(towers, torch.from_numpy(d["x_v"]), torch.from_numpy(d["x_t"]), sigma, g)

    tr, te = feats(train_data, 0.0, 0), feats(test_data, 0.0, 0)
    noisy = feats(test_data, cfg.sigma_shift, cfg.seed + 2)
    # PAPER (Sec. 5, linear probing): a logistic regression on the frozen image features. We probe
    # the backbone h for every variant (so Sep is not credited for its extra head's dimensions),
    # and the shared feature z, the one Theorem 3.1 is about (aligned with the text).
    y_tr, y_te = train_data["y"], test_data["y"]
    probe_acc, probe_ce = _probe(tr["h_v"].numpy(), y_tr, te["h_v"].numpy(), y_te, cfg.seed)
    probe_z_acc, _ = _probe(tr["z_v"].numpy(), y_tr, te["z_v"].numpy(), y_te, cfg.seed)
    # PAPER (Sec. 5, zero-shot): a class "prompt" embedding; ours is the mean text feature.
    protos = class_prototypes(tr["z_t"], torch.from_numpy(train_data["c"]))  # (4, E)
    c_te = torch.from_numpy(test_data["c"])

    def zero_shot(z_v):  # (N, E) image features -> accuracy of the nearest text prototype
        return float(((z_v @ protos.T).argmax(1) == c_te).float().mean())

    r = {"probe_acc": probe_acc, "probe_ce": probe_ce, "probe_z_acc": probe_z_acc,
         "zs_acc": zero_shot(te["z_v"]), "zs_noise_acc": zero_shot(noisy["z_v"])}
    # The headline's shift: the same test latents seen through a changed image sensor.
    for rho, x_v in test_data.get("x_v_sensor", {}).items():
        r[f"zs_sensor{rho}"] = zero_shot(towers["v"](torch.from_numpy(x_v))[1])
    # A collapse guard: a feature that keeps only the class would score near 1 on zero-shot, but
    # it cannot pick out its own caption among the test pairs (chance 1 / n_test).
    sim = te["z_v"] @ te["z_t"].T  # (N, N)
    r["retrieval_r1"] = float((sim.argmax(1) == torch.arange(len(sim))).float().mean())
    r["gap"] = modality_gap(te["z_v"], te["z_t"])
    return r


def train(cfg: Config) -> dict:
    """Train every variant and evaluate it. Returns the results; writes nothing."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t_start = time.time()
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    train_data = make_dataset(cfg, cfg.n_train, rng)
    test_data = make_dataset(cfg, cfg.n_test, rng, shift_rhos=SHIFT_DIAL)
    theory = theorem_gap_terms(toy_pmf())
    print(f"Theorem 3.1 on the toy: Delta_p = {theory['delta_p']:.4f} nats (ln 2); aligned "
          f"features pay >= {theory['excess_ce']:.4f} nats of CE and reach <= "
          f"{theory['aligned_acc_ceiling']:.2f} accuracy on Y; the image alone reaches 1.00.")
    names = cfg.variants.split(",")
    results, histories = {}, {}
    for name in names:
        _, histories[name], results[name] = train_variant(name, cfg, train_data, test_data)
        r = results[name]
        print(f"{name:>6} done | probe h {r['probe_acc']:.3f} | probe z {r['probe_z_acc']:.3f} | "
              f"zero-shot {r['zs_acc']:.3f} | sensor shift {r[HEAD_KEY]:.3f} | noise "
              f"{r['zs_noise_acc']:.3f} | R@1 {r['retrieval_r1']:.3f} | gap {r['gap']:.3f}")
    metrics = {"delta_p": theory["delta_p"], "aligned_acc_ceiling": theory["aligned_acc_ceiling"]}
    for name in names:
        for k, v in results[name].items():
            metrics[f"{name}/{k}"] = v
        metrics[f"{name}/final_loss"] = histories[name]["loss"][-1]
        # the first checkpoint: the same model before training has aligned it further
        for k in ("probe_acc", "probe_z_acc", "gap"):
            metrics[f"{name}/{k}_first_eval"] = histories[name][k][0]
    return {"cfg": cfg, "t_start": t_start, "history": histories, "metrics": metrics,
            "results": results, "theory": theory,
            "arms": {VARIANT_NAMES[n]: arm_record(n, cfg) for n in names}}


def structure_table(results: dict, key: str) -> dict:
    """PLUMBING: {base loss: [none, Sep, Br, GC]} of results[...][key] (None where not run)."""
    table = {}
    for base, prefix in (("CLIP", ""), ("CLIP + in-modal", "im_")):
        names = ["im" if prefix else "clip"] + [prefix + r for r in ("sep", "br", "gc")]
        row = [results[n][key] if n in results else None for n in names]
        if any(v is not None for v in row):
            table[base] = row
    return table


def _claim(metric, key, hib, method, baseline, expect, **extra) -> dict:
    """PLUMBING: one CLAIMS entry comparing two variants on metrics["<variant>/<key>"]."""
    return dict(metric=metric, higher_is_better=hib, expect=expect,
                method=(VARIANT_NAMES[method], f"{method}/{key}"),
                baseline=(VARIANT_NAMES[baseline], f"{baseline}/{key}"), **extra)


ZS_SENSOR = f"zero-shot acc, sensor-shifted images (rho {SHIFT_RHO})"
ZS_NOISE, PROBE_H = "zero-shot acc, noisier images (the augmentation's family)", \
    "probe acc on Y (backbone h)"
R1 = "image->text retrieval R@1 (collapse guard)"
PROBE_MARGIN = dict(margin=0.02, margin_why=(
    "stated before the runs: the probe's reducible range is 0.5 (exactly aligned features) to "
    "1.0 (the image); 0.02 is 4 % of it, four standard errors of a 2,000-pair test accuracy near "
    "0.99"))
# The claims this run checks, in order; the first `better` row is the folder's headline. The
# `expect` of each row was fixed on the tuning seeds 100-102 (each arm at its TUNED budget) before
# seeds 0-4 ran: "better" rows held there on 3/3 seeds, except the first, the paper's claim
# against the strongest rival, which held on 1/3 and stays the headline (CONTRIBUTING.md, 2; the
# README reads it by its paired 95 % interval over seeds 0-4, `--paired-from`); GC against the
# base loss held on 2/3 and is reported. "report" rows are reported negatives or diagnostics.
# A row appears when both of its arms ran.
CLAIMS = [
    # The headline: a shift of another family than the augmentation, against the strongest rival
    # (the paper's base loss with stronger augmentation) and the paper's base loss itself.
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_gc", "im_aug", "better"),
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_gc", "im", "report"),
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_br", "im_aug", "report"),
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_br", "im", "better"),
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_sep", "im", "report"),
    _claim(ZS_SENSOR, HEAD_KEY, True, "im_aug", "im", "report"),
    # the dial: a weaker and a stronger sensor shift
    *[_claim(f"zero-shot acc, sensor-shifted images (rho {rho})", f"zs_sensor{rho}", True,
             "im_gc", base, "report") for rho in SHIFT_DIAL if rho != SHIFT_RHO
      for base in ("im_aug", "im")],
    # the old "shift": stronger input noise, the family the augmentation trains
    _claim(ZS_NOISE, "zs_noise_acc", True, "im_gc", "im", "better"),
    _claim(ZS_NOISE, "zs_noise_acc", True, "im_gc", "im_aug", "report"),
    # collapse guards beside the headline: a class-only feature would ace zero-shot, not these
    _claim(R1, "retrieval_r1", True, "im_gc", "im", "report"),
    _claim(R1, "retrieval_r1", True, "im_gc", "im_aug", "report"),
    _claim(PROBE_H, "probe_acc", True, "im_gc", "im", "report"),
    # what only the image knows (Thm 3.1): the probe on Y
    _claim(PROBE_H, "probe_acc", True, "im_sep", "im", "level", **PROBE_MARGIN),
    _claim(PROBE_H, "probe_acc", True, "im_br", "im", "report"),
    _claim(PROBE_H, "probe_acc", True, "im", "clip", "better"),
    _claim(PROBE_H, "probe_acc", True, "sep", "clip", "better"),
    _claim(PROBE_H, "probe_acc", True, "gc", "clip", "report"),
    _claim(PROBE_H, "probe_acc", True, "br", "clip", "report"),
    # forced alignment (Sec. 3.1), when --variants includes align
    _claim("modality gap (forcing alignment shrinks it)", "gap", False, "align", "clip", "report"),
    _claim("probe acc on Y, shared feature z", "probe_z_acc", True, "clip", "align", "report"),
]


def theorem_claims(histories: dict) -> list[dict]:
    """Theorem 3.1 along one run: CLIP's first checkpoint against its last (diagnostics).

    Theorem 3.1 bounds what *exactly aligned* features keep; we measure a correlation along one
    run: CLIP's shared feature z at its first checkpoint (step eval_every) against the same run at
    the end of training, for the modality gap and for the probe on z and on the backbone h.
    These rows are "report", not claims: the features never become exactly aligned.
    """
    if "clip" not in histories or len(histories["clip"]["eval_step"]) < 2:
        return []
    h = histories["clip"]
    first, last = f"CLIP at step {h['eval_step'][0]}", f"CLIP at step {h['eval_step'][-1]}"
    rows = []
    for metric, key, hib in (("modality gap as CLIP trains (Thm 3.1)", "gap", False),
                             ("probe acc on Y of z as CLIP trains (Thm 3.1)", "probe_z_acc", True),
                             ("probe acc on Y of h as CLIP trains", "probe_acc", True)):
        # the method is the later checkpoint for the gap (smaller = more aligned), the earlier
        # one for the probes (higher = before alignment tightened)
        pair = [(last, f"clip/{key}"), (first, f"clip/{key}_first_eval")]
        m, b = pair if key == "gap" else pair[::-1]
        rows.append(dict(metric=metric, higher_is_better=hib, expect="report", method=m,
                         baseline=b))
    return rows


def premise_rows(m: dict, theory: dict) -> list[dict]:
    """Does this toy pose the paper's problem? Thm 3.1's gap, what CLIP loses, the shift's bite."""
    rows = [
        premise_row("information gap Delta_p = |I(X_T;Y) - I(X_V;Y)| (nats): the image knows "
                    "something about Y the text does not", theory["delta_p"], ">=", 0.1),
        premise_row("accuracy on Y of exactly aligned features (Thm 3.1's ceiling; the image "
                    "alone reaches 1)", theory["aligned_acc_ceiling"]),
    ]
    if "clip/gap" in m:
        rows += [premise_row("trained CLIP's modality gap mean ||z_V - z_T|| (0 = aligned)",
                             m["clip/gap"]),
                 premise_row("image-only information CLIP's shared feature loses: 1 - probe z acc "
                             "on Y", 1.0 - m["clip/probe_z_acc"], ">=", 0.05)]
    if f"im/{HEAD_KEY}" in m:
        rows += [premise_row(f"the shift bites: the paper's base loss loses zero-shot acc from "
                             f"clean to sensor-shifted images (rho {SHIFT_RHO})",
                             m["im/zs_acc"] - m[f"im/{HEAD_KEY}"], ">=", 0.05),
                 premise_row("...but is not destroyed: its sensor-shifted zero-shot acc (chance "
                             "0.25)", m[f"im/{HEAD_KEY}"], ">=", 0.40),
                 premise_row("the shifted rows' ceiling: the base loss's clean zero-shot acc",
                             m["im/zs_acc"])]
    return rows


def report(results: dict) -> dict:
    """The premise, the tables, summary.json, the plots and the verdict. Returns the summary."""
    cfg, m, theory = results["cfg"], results["metrics"], results["theory"]
    res, histories = results["results"], results["history"]
    names = list(res)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    premise = premise_rows(m, theory)
    print_premise(premise)
    cols = ("probe_acc", "probe_z_acc", "probe_ce", "zs_acc", HEAD_KEY, "zs_noise_acc",
            "retrieval_r1", "gap")
    print("\n| variant (the regularisers are the method) | probe h | probe z | probe CE | "
          "zero-shot | sensor shift | noise | R@1 | gap |\n|---|---|---|---|---|---|---|---|---|")
    for name in names:
        label = VARIANT_NAMES[name] + (" (method)" if split_variant(name)[1] else "")
        label += " (rival)" if name == "im_aug" else ""
        print(f"| {label} | " + " | ".join(f"{res[name][k]:.3f}" for k in cols) + " |")
    print(f"ceilings: exactly aligned features {theory['aligned_acc_ceiling']:.2f} on Y, image "
          f"1.00; zero-shot chance {1 / N_CLASS:.2f}; R@1 chance {1 / cfg.n_test:.4f}")
    print("\nzero-shot acc along the sensor-shift dial (rho = 0 is the training sensor):\n"
          "| variant | " + " | ".join(f"rho {r}" for r in (0,) + SHIFT_DIAL) + " |\n"
          + "|---" * (len(SHIFT_DIAL) + 2) + "|")
    for name in names:
        vals = [res[name]["zs_acc"]] + [res[name][f"zs_sensor{r}"] for r in SHIFT_DIAL]
        print(f"| {VARIANT_NAMES[name]} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    for key, what in (("probe_acc", PROBE_H), (HEAD_KEY, ZS_SENSOR)):
        table = structure_table(res, key)
        if table:
            print(f"\n{what}: base loss x regulariser (the regularisers are the method)")
            print("| base loss       |  none |  + Sep |  + Br  |  + GC  |")
            for base, row in table.items():
                print(f"| {base:<15} | " + " | ".join(
                    "  -  " if v is None else f"{v:.3f}" for v in row) + " |")
    claims = [c for c in CLAIMS if c["method"][1] in m and c["baseline"][1] in m]
    headline = headline_rows(claims + theorem_claims(histories), m)
    plot(res, histories, theory, out / "latent_structure.png")
    plot_alignment(histories, theory, out / "alignment_curve.png")
    # the checkpoints of every arm, for the budget figure (`--curves-from`) of the tuning sweeps
    (out / "curves.json").write_text(json.dumps({"budget": cfg.budget, "lr": cfg.lr,
                                                 "arms": results["arms"], "history": {
                                                     n: {k: v for k, v in h.items() if k != "loss"}
                                                     for n, h in histories.items()}}))
    summary = write_summary(cfg, out, results["t_start"], m, headline, premise, results["arms"])
    print(f"({summary['wall_seconds']:.1f} s)")
    print_verdict(headline, cfg.quick, out, results["t_start"])
    return summary


def _pyplot():
    """PLUMBING: matplotlib's pyplot, on the Agg backend unless a notebook shows the figures."""
    import matplotlib

    if not IN_NOTEBOOK:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict, histories: dict, theory: dict, path: Path) -> None:
    """Three panels, one colour per arm: (1) probe accuracy on Y per arm, with the two ceilings;
    (2) zero-shot accuracy along the sensor-shift dial; (3) probe accuracy against the modality
    gap along training (big dot = end)."""
    plt = _pyplot()
    ceil = theory["aligned_acc_ceiling"]
    names = list(results)
    fig, ax = plt.subplots(1, 3, figsize=(17, 5))

    def label(n):
        return VARIANT_NAMES[n] + (" (method)" if split_variant(n)[1] else "") + (
            " (rival)" if n == "im_aug" else "")

    x = np.arange(len(names))
    ax[0].bar(x, [results[n]["probe_acc"] for n in names],
              color=[ARM_COLORS[n] for n in names])
    ax[0].set_xticks(x, [label(n) for n in names], rotation=35, ha="right", fontsize=8)
    ax[0].axhline(ceil, ls="--", color="k", label="ceiling, exactly aligned features")
    ax[0].axhline(1.0, ls=":", color="k", label="image-only ceiling")
    ax[0].set_ylim(0.4, 1.12)
    ax[0].set_ylabel("linear-probe accuracy on Y (backbone h)")
    ax[0].legend(fontsize=8, loc="upper left", ncol=2)
    rhos, lowest = (0.0,) + SHIFT_DIAL, 1.0
    for n in names:
        vals = [results[n]["zs_acc"]] + [results[n][f"zs_sensor{r}"] for r in SHIFT_DIAL]
        lowest = min(lowest, *vals)
        ax[1].plot(rhos, vals, "-o" if split_variant(n)[1] else "--s", color=ARM_COLORS[n],
                   label=label(n), ms=4)
    ax[1].axvline(SHIFT_RHO, color="grey", lw=0.8, ls=":")
    ax[1].set_ylim(max(0.0, lowest - 0.05), 1.01)
    ax[1].set_xlabel("sensor shift rho (0 = the training sensor; dotted line = headline)")
    ax[1].set_ylabel(f"zero-shot accuracy on c (chance {1 / N_CLASS:.2f})")
    ax[1].legend(fontsize=7, loc="lower left")
    for n in names:
        h = histories[n]
        ax[2].plot(h["gap"], h["probe_acc"], "-o", ms=2, color=ARM_COLORS[n], label=label(n))
        ax[2].plot(h["gap"][-1], h["probe_acc"][-1], "o", ms=7, color=ARM_COLORS[n])
    ax[2].axhline(ceil, ls="--", color="k")
    ax[2].set_ylim(0.4, 1.02)
    ax[2].set_xlabel("modality gap  mean ||z_V - z_T||  (big dot = end of training)")
    ax[2].set_ylabel("probe accuracy on Y (h)")
    ax[2].legend(fontsize=7, loc="lower right")
    fig.suptitle("Latent modality structures in miniature (one seed; solid lines / '(method)' = "
                 "the paper's regularisers)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)


def plot_alignment(histories: dict, theory: dict, path: Path) -> None:
    """Theorem 3.1 along training, for the two base losses and GC on the paper's (where run): the
    modality gap, and the probe accuracy on Y of the backbone h and of the shared feature z,
    against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.4))
    for n in ("clip", "im", "im_gc"):
        if n not in histories:
            continue
        h, color = histories[n], ARM_COLORS[n]
        name = VARIANT_NAMES[n] + (" (method)" if split_variant(n)[1] else "")
        ax[0].plot(h["eval_step"], h["gap"], "-o", ms=3, color=color, label=name)
        ax[1].plot(h["eval_step"], h["probe_acc"], "-o", ms=3, color=color,
                   label=f"{name}: h (backbone)")
        ax[1].plot(h["eval_step"], h["probe_z_acc"], "--s", ms=3, color=color,
                   label=f"{name}: z (shared feature)")
    ax[0].set_ylabel("modality gap  mean ||z_V - z_T||")
    ax[1].axhline(theory["aligned_acc_ceiling"], ls=":", color="k",
                  label="ceiling if z_V = z_T exactly")
    ax[1].set_ylabel("probe accuracy on Y")
    ax[1].set_ylim(0.4, 1.02)
    for a in ax:
        a.set_xlabel("training step")
        a.legend(fontsize=7, loc="lower left")
    fig.suptitle("Alignment along training: the two base losses and GC (test pairs, one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)


def budget_curves(tune_dir: Path, key: str = HEAD_KEY) -> dict:
    """Each arm's metric against steps, per sweep point, averaged over the tuning seeds.

    Reads every `curves.json` under tune_dir written by `--budget shared` runs (one sweep point
    per folder, seeds as subfolders `seed<N>`). A sweep point is (lr, sigma_aug): the learning
    rate and the noise of the arm's augmented view (only the rival's varies). Where one seed of one
    point was run twice (a sweep extended to more steps), the longer run counts, once.
    Returns {arm: {(lr, sigma_aug): (steps, mean, n_seeds)}}, steps common to all seeds.
    """
    runs = {}  # {arm: {(lr, sigma): {seed: {step: value}}}}
    for i, f in enumerate(sorted(Path(tune_dir).rglob("curves.json"))):
        c = json.loads(f.read_text())
        if c.get("budget") != "shared":
            continue
        found = re.search(r"seed(\d+)", f.parent.name)
        seed = int(found.group(1)) if found else -1 - i  # a folder without a seed is its own
        for arm, h in c["history"].items():
            if key not in h:
                continue
            sigma = c.get("arms", {}).get(VARIANT_NAMES[arm], {}).get("sigma_aug")
            point = runs.setdefault(arm, {}).setdefault((c["lr"], sigma), {})
            curve = dict(zip(h["eval_step"], h[key]))
            if len(curve) > len(point.get(seed, {})):
                point[seed] = curve
    curves = {}
    for arm, by_point in runs.items():
        for pt, seeds in by_point.items():
            steps = sorted(set.intersection(*(set(s) for s in seeds.values())))
            curves.setdefault(arm, {})[pt] = (
                steps, [float(np.mean([s[t] for s in seeds.values()])) for t in steps],
                len(seeds))
    return curves


def choose_budgets(curves: dict) -> dict:
    """The tuning rule: per arm, the (lr, sigma_aug, steps) with the best mean metric over the
    tuning seeds (points run on fewer seeds than the arm's others are left out); ties -> fewer
    steps, then the larger lr. `edges` names each edge of the grid the choice sits on
    (the last checkpoint of its lr, the largest or smallest lr, sigma): a choice at an edge
    means the grid was too small there (EXPERIMENTS.md, section 3)."""
    best = {}
    for arm, by_pt in curves.items():
        # only points run on every tuning seed compete (a mean over fewer seeds is another mean)
        n_max = max(n for _, _, n in by_pt.values())
        by_pt = {pt: c for pt, c in by_pt.items() if c[2] == n_max}
        cands = [(v, -t, lr, sigma or 0.0) for (lr, sigma), (steps, vals, _) in by_pt.items()
                 for t, v in zip(steps, vals)]
        v, neg_t, lr, sigma = max(cands)
        sigma = next(s for (l, s) in by_pt if l == lr and (s or 0.0) == sigma)
        lrs = sorted({l for l, s in by_pt if s == sigma})
        sigmas = sorted({s or 0.0 for l, s in by_pt if l == lr})
        edges = [e for e, hit in (
            ("last checkpoint", -neg_t == by_pt[(lr, sigma)][0][-1]),
            ("largest lr", len(lrs) > 1 and lr == lrs[-1]),
            ("smallest lr", len(lrs) > 1 and lr == lrs[0]),
            ("largest sigma", len(sigmas) > 1 and (sigma or 0.0) == sigmas[-1]),
            ("smallest sigma", len(sigmas) > 1 and (sigma or 0.0) == sigmas[0])) if hit]
        best[arm] = {"lr": lr, "steps": -neg_t, "sigma_aug": sigma, "value": v, "edges": edges}
    return best


def plot_budgets(curves: dict, best: dict, path: Path) -> None:
    """The metric-vs-compute figure: one panel per arm, one line per sweep point (lr, sigma)."""
    plt = _pyplot()
    arms = [n for n in VARIANTS if n in curves]
    cols = 4
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(18, 4.2 * rows), sharey=True, squeeze=False)
    styles = ["-", "--", ":", "-.", (0, (6, 1, 1, 1, 1, 1)), (0, (1, 3))]
    for ax, arm in zip(axes.flat, arms):
        sigmas = sorted({s or 0.0 for _, s in curves[arm]})
        for lr, sigma in sorted(curves[arm], key=lambda p: (p[1] or 0.0, p[0])):
            steps, vals, n = curves[arm][(lr, sigma)]
            tag = f", sigma {sigma:g}" if len(sigmas) > 1 else ""
            # one line style per lr, one shade per sigma (only the rival has several)
            style = styles[sorted({l for l, s in curves[arm] if s == sigma}).index(lr)
                           % len(styles)]
            shade = 0.35 + 0.65 * sigmas.index(sigma or 0.0) / max(len(sigmas) - 1, 1)
            ax.plot(steps, vals, linestyle=style, color=ARM_COLORS[arm],
                    alpha=shade if len(sigmas) > 1 else 1.0, marker="o", ms=2,
                    label=f"lr {lr:g}{tag} ({n} seeds)")
        b = best[arm]
        tag = f", sigma {b['sigma_aug']:g}" if len(sigmas) > 1 else ""
        ax.plot(b["steps"], b["value"], "k*", ms=12, label=f"chosen: lr {b['lr']:g}{tag}, "
                                                              f"{b['steps']} steps")
        title = VARIANT_NAMES[arm] + (" (method)" if split_variant(arm)[1] else "")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step (Adam, batch 128)")
        ax.set_ylabel(f"zero-shot acc, sensor shift rho {SHIFT_RHO}")
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    fig.suptitle("Each arm's headline metric against compute, mean over the tuning seeds 100-102")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)


def paired_intervals(run_dir: Path) -> list[dict]:
    """Each claim row over the seeds under run_dir (`seed<N>/summary.json`): the paired
    difference method - baseline per seed, its mean and a 95 % t-interval of the mean.

    This is how the README reads a `better` row whose margin is small: the k/5 count says on how
    many seeds the method was ahead, the interval whether the mean difference is told apart from 0.
    """
    # PLUMBING: Student's t quantile t(0.975, df) for df = 1..10 (scipy is not a pinned package);
    # beyond 10 seeds the normal 1.96 is within 0.27 of it.
    t975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
    per_row = {}
    for f in sorted(Path(run_dir).glob("seed*/summary.json")):
        for r in json.loads(f.read_text())["headline"]:
            if r["expect"] == "report":
                continue
            k = (r["metric"], r["method"]["name"], r["baseline"]["name"], r["expect"])
            per_row.setdefault(k, []).append(r["method"]["value"] - r["baseline"]["value"])
    rows = []
    for (metric, method, baseline, expect), d in per_row.items():
        n, mean = len(d), float(np.mean(d))
        t_q = t975[n - 2] if n - 1 <= len(t975) else 1.96
        half = float(t_q * np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        rows.append({"metric": metric, "method": method, "baseline": baseline, "expect": expect,
                     "n_seeds": n, "diffs": [float(x) for x in d], "mean": mean,
                     "ci95": (mean - half, mean + half)})
    return rows


# %% 7. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    prepare_out_dir(cfg.out_dir)  # before training: a bad --out-dir fails in a second
    # PLUMBING: tiny models; one BLAS thread for the sklearn probes too (measured: 0.12 CPU-s per
    # evaluation against 0.93 with two threads on the shared 2-core machine). sklearn is imported
    # first so that scipy's own BLAS is loaded when the limit is set.
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    if cfg.curves_from:  # the tuning sweeps' budget figure and each arm's best (lr, steps)
        curves = budget_curves(Path(cfg.curves_from))
        if not curves:
            raise SystemExit(f"{FOLDER}/train.py: error: --curves-from {cfg.curves_from!r}: no "
                             "curves.json of a --budget shared run under it")
        best = choose_budgets(curves)
        plot_budgets(curves, best, Path(cfg.out_dir) / "budget_curves.png")
        print(json.dumps(best, indent=1))
        return best
    if cfg.paired_from:  # the paired 95 % intervals of the claim rows over the reported seeds
        rows = paired_intervals(Path(cfg.paired_from))
        if not rows:
            raise SystemExit(f"{FOLDER}/train.py: error: --paired-from {cfg.paired_from!r}: no "
                             "seed*/summary.json with claim rows under it")
        print("| metric | method | baseline | expect | method - baseline per seed | mean | 95 % "
              "interval |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['metric']} | {r['method']} | {r['baseline']} | {r['expect']} | "
                  + " ".join(f"{x:+.3f}" for x in r["diffs"])
                  + f" | {r['mean']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] |")
        return {"paired": rows}
    # PLUMBING: tiny MLPs; one thread was faster than two in our measurement (README, Run).
    torch.set_num_threads(1)
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
