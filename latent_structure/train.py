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
two small towers with each variant: two base losses (plain CLIP, and the paper's base loss with
its in-modal terms) times (no regulariser, Sep, Br, GC), plus a forced alignment. Then we
linear-probe the frozen image backbone h and the shared image feature z for Y, classify c
zero-shot with text prototypes (clean and shifted images), and measure the modality gap. The
mixing matrices of the toy's 'sensors' change with --seed (or --data-seed).

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

What the miniature simplifies: synthetic vectors instead of images and captions, 2-layer MLP
towers instead of ResNet-50/BERT, Gaussian input noise instead of crop/flip/EDA, 4,000 pairs
instead of CC3M, a handful of seconds of Adam per variant, and no ALBEF fusion experiments.

Run:   python latent_structure/train.py          (nine variants, one seed, under a minute of CPU)
Ends:  a table `variant | probe h | probe z | probe CE | zero-shot | shifted | gap`, the two
       base-loss x regulariser tables (probe on Y, shifted zero-shot), then one verdict line per
       headline row and the files written.
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FOLDER = "latent_structure"
# PLUMBING: two base losses x (no regulariser, Sep, Br, GC), the forced alignment of Sec. 3.1,
# and all three regularisers together. A name "im_<reg>" puts <reg> on the paper's base loss.
VARIANTS = ("clip", "sep", "br", "gc", "im", "im_sep", "im_br", "im_gc", "align", "all")
DEFAULT_VARIANTS = ("clip", "sep", "br", "gc", "im", "im_sep", "im_br", "im_gc")
VARIANT_NAMES = {"clip": "CLIP", "sep": "CLIP + Sep", "br": "CLIP + Br", "gc": "CLIP + GC",
                 "im": "CLIP + in-modal", "im_sep": "CLIP + in-modal + Sep",
                 "im_br": "CLIP + in-modal + Br", "im_gc": "CLIP + in-modal + GC",
                 "align": "CLIP + Align", "all": "CLIP + Sep+Br+GC"}


def split_variant(name: str) -> tuple[bool, str]:
    """PLUMBING: "im_gc" -> (True, "gc"): (in-modal base loss?, regulariser or "" for none)."""
    inmodal = name == "im" or name.startswith("im_")
    reg = name[3:] if name.startswith("im_") else ("" if name in ("im", "clip") else name)
    return inmodal, reg


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu only in this folder"})
    steps: int = field(default=1500, metadata={"help": "Adam steps per variant"})  # paper: 64 ep
    variants: str = field(default=",".join(DEFAULT_VARIANTS),
                          metadata={"help": "comma-separated subset of " + ",".join(VARIANTS)})
    data_seed: int = field(default=-1, metadata={
        "help": "seed of the mixing matrices (the toy's 'sensors'); -1 = the same as --seed"})
    n_train: int = field(default=4000, metadata={"help": "training pairs"})  # paper: CC3M
    n_test: int = field(default=2000, metadata={"help": "test pairs"})
    batch: int = field(default=128, metadata={"help": "batch size N"})  # paper: 128 (CyCLIP)
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})  # paper: 5e-4 AdamW
    # DEVIATION: a fixed temperature; CyCLIP learns the logit scale (clamped at 100).
    tau: float = field(default=0.1, metadata={"help": "InfoNCE temperature"})  # paper: learned
    lam_sep: float = field(default=1.0, metadata={"help": "weight of L_Sep [R]"})
    lam_sep_info: float = field(default=1.0, metadata={
        "help": "weight of L^i_Con + L^i_Uni inside L_Sep (paper: 1)"})
    lam_br: float = field(default=1.0, metadata={"help": "weight of L_Br [R]"})
    lam_gc: float = field(default=0.25, metadata={
        "help": "weight of L_GC + L^a_GC (CyCLIP's recommended cyclic weight)"})
    lam_align: float = field(default=5.0, metadata={"help": "weight of the forced alignment"})
    bridge_t: float = field(default=0.25, metadata={"help": "Brownian-bridge position t"})
    uni_t: float = field(default=2.0, metadata={"help": "uniformity potential scale t"})
    sigma_anchor: float = field(default=0.05, metadata={"help": "input noise of the anchor view"})
    sigma_aug: float = field(default=0.15, metadata={"help": "input noise of the augmented view"})
    sigma_shift: float = field(default=0.5, metadata={"help": "input noise of the shifted test"})
    log_every: int = field(default=300, metadata={"help": "steps between log lines"})
    eval_every: int = field(default=500, metadata={
        "help": "steps between probe/gap checkpoints (the curves in the plot)"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=40, n_train=400, n_test=300, log_every=20, eval_every=20)
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
            p.add_argument(flag, type=kind, default=f.default,
                           help=f.metadata["help"] + " (default: %(default)s)",
                           choices=DEVICES if f.name == "device" else None)
    cfg = Config(**vars(p.parse_args(argv)))
    if not 0 <= cfg.seed < 2**32:
        p.error(f"--seed must be in [0, 2**32), got {cfg.seed}")
    if not -1 <= cfg.data_seed < 2**32:
        p.error(f"--data-seed must be -1 (same as --seed) or in [0, 2**32), got {cfg.data_seed}")
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


def in_notebook() -> bool:
    """PLUMBING: True inside a Jupyter kernel, where sys.argv holds the kernel's own arguments."""
    return "ipykernel" in sys.modules


def prepare_out_dir(path: str) -> Path:
    """PLUMBING: create the run folder and prove it is writable *before* any training.

    A mistyped --out-dir must cost the user one line, not a finished run and a traceback.
    """
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

    The mixing matrices (how each modality's 'sensor' sees the latents) come from `data_seed`,
    which is --seed unless set, so the seed spread also varies the data generator; the samples
    follow `rng`. Delta_p does not depend on the mixing (it is ln 2 for every seed).
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
    # torch.pdist lists each pair j < k once; the mean over j != k is the same (symmetric).
    sq = torch.pdist(z).pow(2)  # (B (B - 1) / 2,) squared distances
    # Sec. 4.1 [R]: G_t(u, v) = exp(-t ||u - v||^2), averaged over the pairs j != k, in the log.
    loss = torch.log(torch.exp(-t * sq).mean())
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


# %% 7. Training
def encode(towers, x_v, x_t, sigma: float, gen: torch.Generator) -> dict:
    """PLUMBING: one noisy view of a batch through both towers. Returns a dict of (B, *) tensors."""
    h_v, z_v, zi_v = towers["v"](x_v + sigma * torch.randn(x_v.shape, generator=gen))
    h_t, z_t, zi_t = towers["t"](x_t + sigma * torch.randn(x_t.shape, generator=gen))
    return {"h_v": h_v, "z_v": z_v, "zi_v": zi_v, "h_t": h_t, "z_t": z_t, "zi_t": zi_t}


def make_views(towers, x_v, x_t, cfg: Config, gen: torch.Generator) -> dict:
    """An anchor view (noise sigma_anchor) and an augmented view (noise sigma_aug) of a batch.

    Args: x_v, x_t (B, D_in). Returns the anchor features under their names (z_v, zi_v, ...) and
    the augmented view's under the same names with "_a" (z_v_a, zi_v_a, ...), all (B, *).
    """
    # PAPER: an anchor view and an augmented view of every image and caption.
    # DEVIATION: Gaussian input noise stands in for crop/flip (images) and EDA (text).
    anc = encode(towers, x_v, x_t, cfg.sigma_anchor, gen)
    aug = encode(towers, x_v, x_t, cfg.sigma_aug, gen)
    return {**anc, **{k + "_a": v for k, v in aug.items()}}


def train_variant(name: str, cfg: Config, data: dict, test: dict) -> tuple[dict, dict, dict]:
    """Train fresh towers with one variant's loss.

    Returns (towers, history, final evaluation) where history holds the loss per step and, every
    `eval_every` steps, the probe accuracies (backbone h and shared feature z) and the modality
    gap on the test pairs (the curves of the plot).
    """
    torch.manual_seed(cfg.seed)  # same initial weights for every variant
    towers = nn.ModuleDict({"v": Tower(), "t": Tower()})
    opt = torch.optim.Adam(towers.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches and augmentation noise
    x_v, x_t = torch.from_numpy(data["x_v"]), torch.from_numpy(data["x_t"])  # (N, 32)
    history = {"loss": [], "eval_step": [], "probe_acc": [], "probe_z_acc": [], "gap": []}
    bar = tqdm(range(cfg.steps), desc=f"{name:>5}", leave=False, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, x_v.shape[0], (cfg.batch,), generator=gen)  # (B,)
        feats = make_views(towers, x_v[idx], x_t[idx], cfg, gen)
        loss, parts = variant_loss(name, cfg, feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["loss"].append(loss.item())
        if (step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1:
            r = evaluate(towers, cfg, data, test)
            history["eval_step"].append(step + 1)
            history["probe_acc"].append(r["probe_acc"])
            history["probe_z_acc"].append(r["probe_z_acc"])
            history["gap"].append(r["gap"])
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            probe = history["probe_acc"][-1] if history["probe_acc"] else float("nan")
            bar.write(f"{name:>5} step {step:4d} | loss {history['loss'][-1]:.4f} "
                      f"| con {parts['con']:.4f} | reg {parts['reg']:.4f} | probe {probe:.3f}")
    return towers, history, r  # the last step always evaluates, so r is the final evaluation


def train(cfg: Config) -> dict:
    """Train every variant, evaluate, print the tables, write summary.json and the plots."""
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
        _, histories[name], results[name] = train_variant(name, cfg, train_data, test_data)
        r = results[name]
        print(f"{name:>6} done | probe h {r['probe_acc']:.3f} | probe z {r['probe_z_acc']:.3f} | "
              f"zero-shot {r['zs_acc']:.3f} | shifted {r['zs_shift_acc']:.3f} | gap {r['gap']:.3f}")

    print("\n| variant                | probe h | probe z | probe CE | zero-shot | shifted "
          "| gap   |\n|------------------------|---------|---------|----------|-----------"
          "|---------|-------|")
    for name in names:
        r = results[name]
        print(f"| {VARIANT_NAMES[name]:<22} | {r['probe_acc']:.3f}   | {r['probe_z_acc']:.3f}   "
              f"| {r['probe_ce']:.3f}    | {r['zs_acc']:.3f}     | {r['zs_shift_acc']:.3f}   "
              f"| {r['gap']:.3f} |")
    print(f"ceilings: exactly aligned features {theory['aligned_acc_ceiling']:.2f}, image 1.00; "
          f"zero-shot chance {1 / N_CLASS:.2f}")
    for key, what in (("probe_acc", "probe acc on Y (backbone h)"),
                      ("zs_shift_acc", "zero-shot acc, shifted images")):
        table = structure_table(results, key)
        if table:
            print(f"\n{what}: base loss x regulariser")
            print("| base loss       |  none |  + Sep |  + Br  |  + GC  |")
            for base, row in table.items():
                print(f"| {base:<15} | " + " | ".join(
                    "  -  " if v is None else f"{v:.3f}" for v in row) + " |")

    metrics = {"delta_p": theory["delta_p"], "aligned_acc_ceiling": theory["aligned_acc_ceiling"]}
    for name in names:
        for k, v in results[name].items():
            metrics[f"{name}/{k}"] = v
        metrics[f"{name}/final_loss"] = histories[name]["loss"][-1]
        # the first checkpoint: the same model before training has aligned it further
        for k in ("probe_acc", "probe_z_acc", "gap"):
            metrics[f"{name}/{k}_first_eval"] = histories[name][k][0]
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
    plot_alignment(histories, theory, out / "alignment_curve.png")
    summary["wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"({summary['wall_seconds']:.1f} s)")
    return {"history": histories, "metrics": metrics, "summary": summary, "results": results}


def structure_table(results: dict, key: str) -> dict:
    """PLUMBING: {base loss: [none, Sep, Br, GC]} of results[...][key] (None where not run)."""
    table = {}
    for base, prefix in (("CLIP", ""), ("CLIP + in-modal", "im_")):
        names = ["im" if prefix else "clip"] + [prefix + r for r in ("sep", "br", "gc")]
        row = [results[n][key] if n in results else None for n in names]
        if any(v is not None for v in row):
            table[base] = row
    return table


# PLUMBING: the headline rows, (metric, key, higher is better, method, baseline, expect).
# "better" rows are claims that held on the tuning seeds 100-102; "report" rows are reported
# negatives or diagnostics (README, "Expected output"). The first "better" row is the index's.
CLAIMS = [
    # the paper's base loss first: what each regulariser adds on top of it
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "im_gc", "im", "better"),
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "im_br", "im", "better"),
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "im_sep", "im", "report"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "im_sep", "im", "level"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "im_gc", "im", "report"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "im_br", "im", "report"),
    # the in-modal terms themselves, and the regularisers on plain CLIP
    ("probe acc on Y (backbone h)", "probe_acc", True, "im", "clip", "better"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "sep", "clip", "better"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "gc", "clip", "better"),
    ("probe acc on Y (backbone h)", "probe_acc", True, "br", "clip", "report"),
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "gc", "clip", "better"),
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "br", "clip", "better"),
    ("zero-shot acc, shifted images", "zs_shift_acc", True, "sep", "clip", "report"),
    # forced alignment (Sec. 3.1), when --variants includes align
    ("modality gap (forcing alignment shrinks it)", "gap", False, "align", "clip", "better"),
    ("probe acc on Y, shared feature z", "probe_z_acc", True, "clip", "align", "report"),
]


def headline_rows(results: dict, histories: dict) -> list:
    """PLUMBING: one row per entry of CLAIMS whose two variants ran, then the theorem's rows.

    Theorem 3.1 bounds what *exactly aligned* features keep; we measure a correlation along one
    run: CLIP's shared feature z at its first checkpoint (step eval_every) against the same run at
    the end of training, for the modality gap and for the probe on z and on the backbone h.
    These rows are diagnostics ("report"), not claims: the features never become exactly aligned.
    """
    rows = [{"metric": metric, "higher_is_better": hib, "expect": expect,
             "method": {"name": VARIANT_NAMES[m], "value": results[m][key]},
             "baseline": {"name": VARIANT_NAMES[b], "value": results[b][key]}}
            for metric, key, hib, m, b, expect in CLAIMS if m in results and b in results]
    if "clip" in histories and len(histories["clip"]["eval_step"]) > 1:
        h = histories["clip"]
        first, last = f"CLIP at step {h['eval_step'][0]}", f"CLIP at step {h['eval_step'][-1]}"
        for metric, key, hib in (("modality gap as CLIP trains (Thm 3.1)", "gap", False),
                                 ("probe acc on Y of z as CLIP trains (Thm 3.1)", "probe_z_acc",
                                  True),
                                 ("probe acc on Y of h as CLIP trains", "probe_acc", True)):
            # the method is the later checkpoint for the gap (smaller = more aligned), the
            # earlier one for the probes (higher = before alignment tightened)
            m, b = ((last, -1), (first, 0)) if key == "gap" else ((first, 0), (last, -1))
            rows.append({"metric": metric, "higher_is_better": hib, "expect": "report",
                         "method": {"name": m[0], "value": h[key][m[1]]},
                         "baseline": {"name": b[0], "value": h[key][b[1]]}})
    return rows


# %% 8. Evaluation and plot
def class_prototypes(z_t: torch.Tensor, c: torch.Tensor, n_class: int = N_CLASS) -> torch.Tensor:
    """Zero-shot class "prompts": the mean *text* feature of each class, re-normalised.

    Args: z_t (N, E) text features of the training pairs; c (N,) their classes.
    Returns (n_class, E), unit rows.
    """
    protos = torch.stack([z_t[c == k].mean(0) for k in range(n_class)])  # (C, E)
    return F.normalize(protos, dim=-1)  # (C, E)


def _probe(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, seed: int):
    """PLUMBING: a standardised logistic regression. Returns (accuracy, cross-entropy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_tr)
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(x_tr), y_tr)
    x_te = scaler.transform(x_te)
    acc = float((probe.predict(x_te) == y_te).mean())
    p_true = probe.predict_proba(x_te)[np.arange(len(x_te)), y_te]
    return acc, float(-np.log(np.clip(p_true, 1e-12, None)).mean())


@torch.no_grad()
def evaluate(towers, cfg: Config, train_data: dict, test_data: dict) -> dict:
    """Linear probes of the frozen image backbone h and of the shared image feature z for Y,
    zero-shot c by text prototypes (clean and shifted images), and the modality gap, all on
    held-out pairs."""

    def feats(d, sigma, seed):
        g = torch.Generator().manual_seed(seed)
        return encode(towers, torch.from_numpy(d["x_v"]), torch.from_numpy(d["x_t"]), sigma, g)

    tr, te = feats(train_data, 0.0, 0), feats(test_data, 0.0, 0)
    shifted = feats(test_data, cfg.sigma_shift, cfg.seed + 2)
    # PAPER (Sec. 5, linear probing): a logistic regression on the frozen image features. We probe
    # the backbone h for every variant (so Sep is not credited for its extra head's dimensions),
    # and the shared feature z, the one Theorem 3.1 is about (aligned with the text).
    y_tr, y_te = train_data["y"], test_data["y"]
    probe_acc, probe_ce = _probe(tr["h_v"].numpy(), y_tr, te["h_v"].numpy(), y_te, cfg.seed)
    probe_z_acc, _ = _probe(tr["z_v"].numpy(), y_tr, te["z_v"].numpy(), y_te, cfg.seed)
    # PAPER (Sec. 5, zero-shot): a class "prompt" embedding; ours is the mean text feature.
    protos = class_prototypes(tr["z_t"], torch.from_numpy(train_data["c"]))  # (4, E)
    c_te = torch.from_numpy(test_data["c"])
    zs = float(((te["z_v"] @ protos.T).argmax(1) == c_te).float().mean())
    zs_shift = float(((shifted["z_v"] @ protos.T).argmax(1) == c_te).float().mean())
    return {"probe_acc": probe_acc, "probe_ce": probe_ce, "probe_z_acc": probe_z_acc,
            "zs_acc": zs, "zs_shift_acc": zs_shift, "gap": modality_gap(te["z_v"], te["z_t"])}


def _pyplot():
    """PLUMBING: matplotlib's pyplot, on the Agg backend unless a notebook shows the figures."""
    import matplotlib

    if not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(results: dict, histories: dict, theory: dict, path: Path) -> None:
    """Three panels: (1) probe accuracy on Y, base loss x regulariser, with the two ceilings;
    (2) zero-shot accuracy on shifted images, same layout; (3) probe accuracy against the
    modality gap along training (one line per variant, big dot = end)."""
    plt = _pyplot()
    colors = {n: f"C{i}" for i, n in enumerate(VARIANTS)}
    ceil = theory["aligned_acc_ceiling"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    regs = ["none", "+ Sep", "+ Br", "+ GC"]
    for k, (key, label, lo) in enumerate((("probe_acc", "linear-probe accuracy on Y (h)", 0.4),
                                          ("zs_shift_acc", "zero-shot accuracy, shifted", 0.5))):
        table = structure_table(results, key)
        x = np.arange(len(regs))
        for i, (base, row) in enumerate(table.items()):
            vals = [np.nan if v is None else v for v in row]
            ax[k].bar(x + (i - 0.5) * 0.38, vals, 0.38, label=f"base: {base}",
                      color="C0" if base == "CLIP" else "C1")
        extra = [n for n in ("align", "all") if n in results]
        for j, n in enumerate(extra):
            ax[k].bar(len(regs) + j, results[n][key], 0.38, color=colors[n])
        ax[k].set_xticks(list(x) + [len(regs) + j for j in range(len(extra))],
                         regs + [VARIANT_NAMES[n].replace("CLIP ", "") for n in extra])
        ax[k].set_ylim(lo, 1.02)
        ax[k].set_ylabel(label)
    ax[0].axhline(ceil, ls="--", color="k", label="ceiling, exactly aligned features")
    ax[0].axhline(1.0, ls=":", color="k", label="image-only ceiling")
    ax[0].legend(fontsize=7, loc="lower right")
    ax[1].legend(fontsize=7, loc="lower right")
    for n, h in histories.items():
        ax[2].plot(h["gap"], h["probe_acc"], "-o", ms=2, color=colors[n], label=VARIANT_NAMES[n])
        ax[2].plot(h["gap"][-1], h["probe_acc"][-1], "o", ms=7, color=colors[n])
    ax[2].axhline(ceil, ls="--", color="k")
    ax[2].set_ylim(0.4, 1.02)
    ax[2].set_xlabel("modality gap  mean ||z_V - z_T||  (big dot = end of training)")
    ax[2].set_ylabel("probe accuracy on Y (h)")
    ax[2].legend(fontsize=6, ncol=2)
    fig.suptitle("Latent modality structures in miniature (one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.show() if in_notebook() else plt.close(fig)


def plot_alignment(histories: dict, theory: dict, path: Path) -> None:
    """Theorem 3.1 along training, for the two base losses (where run): the modality gap, and
    the probe accuracy on Y of the backbone h and of the shared feature z, against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n, color in (("clip", "C0"), ("im", "C1")):
        if n not in histories:
            continue
        h = histories[n]
        ax[0].plot(h["eval_step"], h["gap"], "-o", ms=3, color=color, label=VARIANT_NAMES[n])
        ax[1].plot(h["eval_step"], h["probe_acc"], "-o", ms=3, color=color,
                   label=f"{VARIANT_NAMES[n]}: h (backbone)")
        ax[1].plot(h["eval_step"], h["probe_z_acc"], "--s", ms=3, color=color,
                   label=f"{VARIANT_NAMES[n]}: z (shared feature)")
    ax[0].set_ylabel("modality gap  mean ||z_V - z_T||")
    ax[1].axhline(theory["aligned_acc_ceiling"], ls=":", color="k",
                  label="ceiling if z_V = z_T exactly")
    ax[1].set_ylabel("probe accuracy on Y")
    ax[1].set_ylim(0.4, 1.02)
    for a in ax:
        a.set_xlabel("training step")
        a.legend(fontsize=7)
    fig.suptitle("Alignment along training (test pairs, one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.show() if in_notebook() else plt.close(fig)


# %% 9. The run's last lines
# PLUMBING: what `expect` means (../CONTRIBUTING.md, section 2): "better" = the method should
# beat the baseline; "level" = a control, the two should be within 2 %; "report" = a diagnostic
# or a reported negative, not a claim.
EXPECT = {"better": "method should beat baseline", "level": "control: within 2 % expected",
          "report": "diagnostic, not a claim"}


def seed_record(row: dict) -> str:
    """How often this row held over the seeds in RESULTS.md (written by tools/run_all.py)."""
    # In a notebook there is no __file__: look in the kernel's folder and the one above it.
    here = Path(globals()["__file__"]).resolve().parent if "__file__" in globals() else Path.cwd()
    results = next((d / "RESULTS.md" for d in (here.parent, here) if (d / "RESULTS.md").is_file()),
                   None)
    if results is None:
        return "no RESULTS.md beside this folder"
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
        m, b = row["method"]["value"], row["baseline"]["value"]
        better = (m > b) if row["higher_is_better"] else (m < b)
        level = abs(m - b) <= 0.02 * max(abs(m), abs(b), 1e-12)
        # PLUMBING: the same rule tools/run_all.py counts ("better": strictly ahead; "level":
        # within 2 %), so this seed's line and the k/5 in RESULTS.md never disagree.
        if row["expect"] == "level":
            seen = "level, held" if level else "not level"
        else:
            seen = "method ahead" if better else "baseline ahead"
            seen += " (by < 2 %)" if level else ""
        direction = "higher" if row["higher_is_better"] else "lower"
        print(f"  [{row['expect']}] {row['metric']} ({direction} is better): "
              f"{row['method']['name']} {m:.4g} vs {row['baseline']['name']} {b:.4g} -> {seen}; "
              f"{EXPECT[row['expect']]}; {seed_record(row)}")
    if quick:
        print("NOTE: --quick is a smoke run (seconds, tiny data); its numbers are not meant to "
              "show the paper's effect. Run without --quick for that.")
    written = sorted(p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= t_start)
    print("Files written:", ", ".join(str(p) for p in written) or "none")


# %% 10. Entry point
def main(argv=None) -> dict:
    if argv is None and in_notebook():
        argv = ["--quick"]  # PLUMBING: in a notebook, never parse the kernel's sys.argv
    cfg = parse_args(argv)
    t_start = time.time()
    # PLUMBING: tiny MLPs; one thread was faster than two in our measurement (README, Run).
    torch.set_num_threads(1)
    out = prepare_out_dir(cfg.out_dir)  # before training: a bad --out-dir fails in a second
    result = train(cfg)
    print_verdict(result["summary"]["headline"], cfg.quick, out, t_start)
    return result


if __name__ == "__main__":
    main()
