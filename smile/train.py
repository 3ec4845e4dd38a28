"""SMILE: Scaling Mixture-of-Experts with Efficient Bi-level Routing, in miniature.

Citation: Chaoyang He, Shuai Zheng, Aston Zhang, George Karypis, Trishul Chilimbi,
Mahdi Soltanolkotabi, Salman Avestimehr. "SMILE: Scaling Mixture-of-Experts with Efficient
Bi-level Routing", arXiv preprint 2212.05191, 2022.
Implemented: the bi-level router (inter-node router, then intra-node router), the two-hop
All2All (inter-node group, then intra-node group) with per-level capacity and token dropping, the
combine weight g1 * g2, the additive load-balancing loss (one Switch-style term per level), the
bi-level process groups, and an alpha-beta model of the All2All cost. The baseline is the Switch
Transformer's flat top-1 routing (Fedus et al., JMLR 2022, Eqs. 1-6), whose numbers we use.
Only the abstract and a section summary of SMILE could be read; every exact form below that the
paper's text would fix is our reconstruction and is tagged [R] (see the README for the list).

The idea: a flat MoE layer with one expert per GPU sends every token through one All2All over
all P = N*M GPUs, so each GPU talks to (N-1)*M GPUs on other nodes over the slow network. SMILE
splits the routing decision in two: a small router first picks a *node* (one All2All among the N
GPUs that share a local rank, the only slow hop), then a second router on the receiving GPU picks
a *GPU inside that node* (one All2All over the fast in-node links). Each GPU now sends N-1 large
slow messages instead of (N-1)*M small ones, which is what makes the All2All cheaper when it is
latency-bound; the bytes over the slow network stay the same. A token's output is
g1 * g2 * E(x), so both routers learn from the language-model loss, and a Switch-style
load-balancing term at each level keeps both levels balanced.

Notation (paper -> code):
    N, M            cfg.nodes, cfg.gpus_per_node   nodes, GPUs per node; P = N*M GPUs = experts
    W_node          SmileMoE.w_node                 inter-node router, D -> N
    W_gpu           SmileMoE.w_gpu                  intra-node router, D -> M (shared by nodes) [R]
    p^1, g_1, n*    r1.probs, r1.gate, r1.expert    level-1 probabilities, gate, chosen node
    p^2, g_2, m*    r2.probs, r2.gate, r2.expert    level-2 probabilities, gate, chosen GPU
    C_1, C_2        C1, C2                          capacity per (source GPU, node) / (GPU, GPU)
    cf_1, cf_2      cfg.cf1, cfg.cf2                capacity factors
    f_i, P_i        f, P_mean                       dispatch fraction, mean router probability
    alpha_1,2       cfg.alpha1, cfg.alpha2          load-balancing coefficients
Dimensions: B sequences, L positions, V vocabulary, D model width, H expert width, G devices held
by this process (all P in the simulation, 1 per rank in --distributed), T tokens per device,
E experts (= P), C capacity slots, S slots a level-2 router sees (= N*C1).

What the miniature simplifies: 8 simulated "GPUs" (2 nodes x 4) inside one process, a 2-block
Transformer on a synthetic 8-language bigram corpus instead of T5-style models on C4, and an
alpha-beta cost model instead of a cluster. `--distributed` runs the same layer over real
process groups (gloo on CPU here; NCCL on GPUs, not run on GPUs by us).

Run:   python smile/train.py            (about a minute on CPU)
       python smile/train.py --distributed --nodes 2 --gpus-per-node 2     (4 gloo processes)
Ends:  a table `val loss | drop % | ...` for dense / Switch / SMILE, the message counts from the
       last batch's routing, and the modelled All2All time flat vs SMILE for N = 2..32 nodes.
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FOLDER = "smile"
VARIANTS = ("dense", "switch", "smile")


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu, or cuda (NCCL with --distributed)"})
    steps: int = field(default=300, metadata={"help": "training steps per variant"})
    variants: str = field(default="dense,switch,smile",
                          metadata={"help": "comma-separated subset of dense,switch,smile"})
    nodes: int = field(default=2, metadata={"help": "N, number of (simulated) nodes"})
    gpus_per_node: int = field(default=4, metadata={"help": "M, (simulated) GPUs per node"})
    vocab: int = field(default=64, metadata={"help": "V, toy vocabulary size"})
    n_langs: int = field(default=8, metadata={"help": "number of toy bigram 'languages'"})
    seq_len: int = field(default=32, metadata={"help": "L, tokens per sequence"})
    batch: int = field(default=32, metadata={"help": "B, sequences per step (all devices)"})
    d_model: int = field(default=64, metadata={"help": "D, model width"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    n_layers: int = field(default=2, metadata={"help": "Transformer blocks (each FFN is MoE)"})
    d_ff: int = field(default=128, metadata={"help": "H, width of one expert / the dense FFN"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    cf: float = field(default=1.25, metadata={"help": "Switch capacity factor (paper: 1.0-1.25)"})
    cf1: float = field(default=1.25, metadata={"help": "SMILE level-1 capacity factor [R]"})
    # DEVIATION [R]: cf2 = 1.0 (not 1.25) so every SMILE expert has as many slots as a Switch
    # expert (M * C2 = P * C); with 1.25 SMILE would get 25% more capacity than its baseline.
    cf2: float = field(default=1.0, metadata={"help": "SMILE level-2 capacity factor [R]"})
    alpha: float = field(default=0.01, metadata={"help": "Switch load-balancing coefficient"})
    alpha1: float = field(default=0.01, metadata={"help": "SMILE level-1 LB coefficient [R]"})
    alpha2: float = field(default=0.01, metadata={"help": "SMILE level-2 LB coefficient [R]"})
    per_node_router: bool = field(default=False, metadata={
        "help": "SMILE: one intra-node router per node instead of one shared by all nodes"})
    val_batches: int = field(default=5, metadata={"help": "fixed validation batches"})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})
    distributed: bool = field(default=False, metadata={
        "help": "run the MoE layers over real torch.distributed groups (spawns N*M processes, "
                "or uses torchrun's)"})
    dist_timeout: int = field(default=60, metadata={
        "help": "seconds before a stuck process-group init or collective fails the run"})
    fail_rank: int = field(default=-1, metadata={
        "help": "(testing) this rank raises at its first step, to show a failed worker stops "
                "the run"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=20, batch=16, val_batches=1, log_every=10)
DEVICES = ("cpu", "cuda")


class RunError(RuntimeError):
    """A known runtime mistake (a failed worker, missing GPUs): main() prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a user mistake is one line on stderr and exit code 2, never a traceback."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _torchrun_env() -> dict | None:
    """PLUMBING: rank/world/local-world from torchrun's environment, or None outside torchrun."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if not all(k in os.environ for k in keys):
        return None
    return {k: int(os.environ[k]) for k in keys}


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
    env = _torchrun_env()
    if cfg.distributed and env is not None:
        # PLUMBING: under torchrun the topology is torchrun's: N = WORLD / LOCAL_WORLD, M = LOCAL.
        cfg.nodes = env["WORLD_SIZE"] // env["LOCAL_WORLD_SIZE"]
        cfg.gpus_per_node = env["LOCAL_WORLD_SIZE"]
    for name in ("steps", "nodes", "gpus_per_node", "vocab", "n_langs", "seq_len", "batch",
                 "d_model", "n_heads", "n_layers", "d_ff", "val_batches", "log_every",
                 "dist_timeout"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "cf", "cf1", "cf2"):
        if not getattr(cfg, name) > 0:
            p.error(f"--{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("alpha", "alpha1", "alpha2"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    bad = set(cfg.variants.split(",")) - set(VARIANTS)
    if bad or not cfg.variants:
        p.error(f"--variants must be a comma-separated subset of {','.join(VARIANTS)}")
    if cfg.d_model % cfg.n_heads:
        p.error(f"--d-model ({cfg.d_model}) must be divisible by --n-heads ({cfg.n_heads})")
    batch = QUICK["batch"] if cfg.quick else cfg.batch
    if batch % (cfg.nodes * cfg.gpus_per_node):
        p.error(f"--batch ({batch}) must be divisible by nodes * gpus-per-node "
                f"({cfg.nodes * cfg.gpus_per_node}): each (simulated) GPU gets whole sequences")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return cfg


# %% 3. Seeding
def set_seed(seed: int) -> None:
    """PLUMBING: seeds random, numpy and torch; the data has its own seeded torch.Generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# %% 4. Toy data: a multilingual bigram corpus
# DEVIATION: a synthetic corpus instead of C4, so a run takes a minute on a laptop CPU.
# PLUMBING: each "language" is a sparse random bigram table (every token has 4 allowed successors).
# A sequence comes from one language, so an expert can specialise in a language; the model has to
# infer the language from the context, which is what makes routing worth learning.
def make_languages(cfg: Config) -> torch.Tensor:
    """Returns the transition tables, (K, V, V); row v of table k is p(next | v, language k)."""
    g = torch.Generator().manual_seed(cfg.seed)
    K, V = cfg.n_langs, cfg.vocab
    succ = torch.rand(K, V, V, generator=g).argsort(-1)[..., :4]  # (K, V, 4) allowed successors
    logits = torch.full((K, V, V), -float("inf"))  # (K, V, V)
    logits.scatter_(-1, succ, torch.randn(K, V, 4, generator=g))
    return logits.softmax(-1)  # (K, V, V)


def sample_batch(tables: torch.Tensor, batch: int, seq_len: int, g: torch.Generator):
    """Returns (idx, targets), both (B, L): next-token prediction on sequences of L + 1 tokens."""
    K, V, _ = tables.shape
    lang = torch.randint(K, (batch,), generator=g)  # (B,)
    seq = [torch.randint(V, (batch,), generator=g)]  # first token uniform
    for _ in range(seq_len):
        probs = tables[lang, seq[-1]]  # (B, V)
        seq.append(torch.multinomial(probs, 1, generator=g).squeeze(1))  # (B,)
    seq = torch.stack(seq, 1)  # (B, L + 1)
    return seq[:, :-1], seq[:, 1:]


# %% 5. The paper's core: top-1 routing, capacity, load balancing, the cost model
class Route(NamedTuple):
    probs: torch.Tensor  # (G, S, E) router probabilities
    expert: torch.Tensor  # (G, S) argmax expert (node / GPU) index
    gate: torch.Tensor  # (G, S) its probability
    loc: torch.Tensor  # (G, S) arrival position in its expert's bucket
    keep: torch.Tensor  # (G, S) bool: routed and inside capacity
    dispatch: torch.Tensor  # (G, S, E, C) 0/1: token s goes to slot c of expert e
    combine: torch.Tensor  # (G, S, E, C) dispatch * gate


def capacity(num_tokens: int, num_experts: int, cf: float | None) -> int:
    """Switch Eq. (3): C = ceil(cf * tokens / experts); cf=None means no drops (C = tokens)."""
    if cf is None:
        return num_tokens
    return max(1, math.ceil(cf * num_tokens / num_experts))


def top1_route(logits: torch.Tensor, cap: int, valid: torch.Tensor | None = None) -> Route:
    """Top-1 routing with first-come capacity, as GShard/Switch dispatch tensors.

    Args: logits (G, S, E) router scores of S tokens on each of G devices; cap = C slots per
    expert; valid (G, S) bool marks real tokens (None = all). Padding slots are never routed.
    Returns a Route; tokens beyond an expert's C slots (in arrival order) are dropped.
    """
    E = logits.shape[-1]
    # DEVIATION: no router z-loss, input jitter or expert dropout (Switch extras that SMILE's
    # summary does not mention); the router runs in float32 like Switch's selective precision.
    # Switch Eq. (1): p_i(x) = exp(h_i(x)) / sum_j exp(h_j(x))
    probs = logits.float().softmax(-1)  # (G, S, E)
    # Switch Eq. (2), k = 1: i* = argmax_i p_i(x), gate = p_{i*}(x)
    gate, expert = probs.max(-1)  # (G, S), (G, S)
    mask = F.one_hot(expert, E)  # (G, S, E)
    if valid is not None:
        mask = mask * valid[..., None].long()  # (G, S, E): padding goes nowhere
    # PAPER: position of each token in its expert's bucket, in arrival order (GShard cumsum).
    loc = ((mask.cumsum(1) - 1) * mask).sum(-1)  # (G, S)
    keep = (mask.sum(-1) > 0) & (loc < cap)  # (G, S)
    slot = F.one_hot(loc.clamp(0, cap - 1), cap)  # (G, S, C)
    dispatch = (mask * keep[..., None])[..., None] * slot[:, :, None, :]  # (G, S, E, C)
    dispatch = dispatch.to(probs.dtype)
    combine = gate[..., None, None] * dispatch  # (G, S, E, C)
    return Route(probs, expert, gate, loc, keep, dispatch, combine)


def load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor, alpha: float,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Eqs. (4)-(6) on each device's tokens: alpha * E * sum_i f_i * P_i.

    Args: probs (G, S, E) router probabilities, expert (G, S) argmax, alpha >= 0, valid (G, S)
    bool (None = all tokens count). Returns (G,): one loss per device. Equals alpha when routing
    is perfectly uniform; only P carries gradient (f counts argmax decisions).
    """
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: set `loss` (G,) to the Switch LB loss alpha * E * sum_i f_i * P_i per device.
    E = probs.shape[-1]
    w = torch.ones_like(expert, dtype=probs.dtype) if valid is None else valid.to(probs.dtype)
    n_tok = w.sum(1).clamp(min=1.0)[:, None]  # (G, 1) tokens that count
    # Eq. (5): f_i = (1/T) sum_x 1{argmax p(x) = i}   (a count: no gradient)
    f = (F.one_hot(expert, E).to(probs.dtype) * w[..., None]).sum(1) / n_tok  # (G, E)
    # Eq. (6): P_i = (1/T) sum_x p_i(x)
    P_mean = (probs * w[..., None]).sum(1) / n_tok  # (G, E)
    # Eq. (4): L_aux = alpha * N * sum_i f_i * P_i   (N = number of experts at this level)
    loss = alpha * E * (f * P_mean).sum(-1)  # (G,)
    # END SOLUTION
    return loss


# DEVIATION: time is modelled, not measured on a multi-node cluster (we have none).
# PAPER [R]: the alpha-beta model of one dispatch All2All per GPU (the combine is symmetric).
# A message of k bytes costs alpha + beta * k; the slow inter-node link is (ALPHA_SLOW, 1/BW_SLOW)
# and the fast in-node link (ALPHA_FAST, 1/BW_FAST). Our numbers, not the paper's: 10 us and a
# 400 Gb/s NIC shared by 8 GPUs between nodes, 2 us and 300 GB/s NVLink inside a node.
ALPHA_SLOW, BW_SLOW = 10e-6, 6.25e9
ALPHA_FAST, BW_FAST = 2e-6, 300e9


def alltoall_cost(N: int, M: int, T: int, d: int, nbytes: int = 2, cf: float = 1.0,
                  cf1: float = 1.0, cf2: float = 1.0) -> dict:
    """Messages, bytes and modelled time of one dispatch All2All per GPU, flat vs SMILE [R].

    Args: N nodes, M GPUs per node, T tokens per GPU, d hidden size, nbytes per element, cf the
    flat capacity factor, cf1/cf2 SMILE's. Buffers are padded to capacity (equal chunks).
    Returns a dict of per-GPU `*_slow_msgs`, `*_fast_msgs`, `*_slow_bytes`, `*_fast_bytes`,
    `*_time` (seconds) for `flat` and `smile`.
    """
    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: build `out`, the docstring's dict of messages, bytes and alpha-beta times.
    P = N * M
    # Flat Switch: one All2All over all P GPUs, a chunk of S/P bytes to every other GPU.
    S = cf * T * d * nbytes  # bytes in this GPU's padded send buffer
    flat_slow, flat_fast = (N - 1) * M, M - 1  # GPUs on other nodes / on this node
    # t_flat = (N-1) M (a_s + b_s S/P) + (M-1) (a_f + b_f S/P)
    t_flat = (flat_slow * (ALPHA_SLOW + S / P / BW_SLOW)
              + flat_fast * (ALPHA_FAST + S / P / BW_FAST))
    # SMILE: inter hop over N GPUs (S1 = cf1 T d b), then intra hop over M GPUs of a node
    # (S2 = cf2 * N * C1 * d * b with C1 = cf1 T / N, i.e. cf1 cf2 T d b).
    S1 = cf1 * T * d * nbytes
    S2 = cf2 * cf1 * T * d * nbytes
    smile_slow, smile_fast = N - 1, M - 1
    # t_smile = (N-1) (a_s + b_s S1/N) + (M-1) (a_f + b_f S2/M)
    t_smile = (smile_slow * (ALPHA_SLOW + S1 / N / BW_SLOW)
               + smile_fast * (ALPHA_FAST + S2 / M / BW_FAST))
    out = {
        "flat_slow_msgs": flat_slow, "flat_fast_msgs": flat_fast,
        "flat_slow_bytes": flat_slow * S / P, "flat_fast_bytes": flat_fast * S / P,
        "flat_time": t_flat,
        "smile_slow_msgs": smile_slow, "smile_fast_msgs": smile_fast,
        "smile_slow_bytes": smile_slow * S1 / N, "smile_fast_bytes": smile_fast * S2 / M,
        "smile_time": t_smile,
    }
    # END SOLUTION
    return out


def message_counts(send_counts: torch.Tensor, N: int, M: int, level: str) -> dict:
    """Non-empty messages and tokens per GPU over each link, from real routing decisions.

    Args: send_counts (P, K) tokens GPU g = (n, m) sends to destination k, where K = P for
    level 'flat' (destination GPU), N for 'inter' (destination node, same local rank) and M for
    'intra' (destination GPU in the same node). Sending to oneself is no message.
    Returns means over GPUs: slow_msgs, slow_tokens, fast_msgs, fast_tokens.
    """
    P = N * M
    g = torch.arange(P)
    node, local = g // M, g % M  # (P,), (P,)
    if level == "flat":
        k = torch.arange(P)
        slow = node[:, None] != (k // M)[None, :]  # (P, P)
        fast = ~slow & (g[:, None] != k[None, :])  # (P, P)
    elif level == "inter":
        slow = node[:, None] != torch.arange(N)[None, :]  # (P, N)
        fast = torch.zeros_like(slow)
    elif level == "intra":
        fast = local[:, None] != torch.arange(M)[None, :]  # (P, M)
        slow = torch.zeros_like(fast)
    else:
        raise ValueError(f"unknown level {level!r}")
    c = send_counts.float()
    return {
        "slow_msgs": ((c > 0) & slow).sum(1).float().mean().item(),
        "slow_tokens": (c * slow).sum(1).mean().item(),
        "fast_msgs": ((c > 0) & fast).sum(1).float().mean().item(),
        "fast_tokens": (c * fast).sum(1).mean().item(),
    }


# %% 6. Communication: simulated devices and real process groups
# PAPER: an All2All with equal chunks is a transpose between "who sends" and "which chunk": after
# it, chunk j on device i is what device j had put in chunk i. The MoE layers below only ever call
# comm.inter / comm.intra / comm.world, so the same routing code runs on 8 simulated GPUs in one
# process (SimulatedComm, a tensor transpose) and on real ranks (DistComm, all_to_all_single).
# DEVIATION: the default run simulates the cluster in one process; --distributed runs the same
# layers over real process groups.
class SimulatedComm:
    """All P = N*M devices in this process; every tensor carries a leading device axis (P, ...)."""

    def __init__(self, N: int, M: int):
        self.N, self.M = N, M
        self.G = N * M  # devices held by this process
        self.device_ids = torch.arange(N * M)  # (G,) global rank of each held device

    def inter(self, buf: torch.Tensor) -> torch.Tensor:
        """(P, N, C, X) chunk n' -> GPU (n', m); returns (P, N, C, X) indexed by source node."""
        N, M = self.N, self.M
        _, _, C, X = buf.shape
        x = buf.reshape(N, M, N, C, X)  # (n_src, m, n_dst, C, X)
        return x.transpose(0, 2).reshape(N * M, N, C, X)  # (n_dst*M + m, n_src, C, X)

    def intra(self, buf: torch.Tensor) -> torch.Tensor:
        """(P, M, C, X) chunk m' -> GPU (n, m'); returns (P, M, C, X) indexed by source GPU."""
        N, M = self.N, self.M
        _, _, C, X = buf.shape
        x = buf.reshape(N, M, M, C, X)  # (n, m_src, m_dst, C, X)
        return x.transpose(1, 2).reshape(N * M, M, C, X)  # (n*M + m_dst, m_src, C, X)

    def world(self, buf: torch.Tensor) -> torch.Tensor:
        """(P, P, C, X) chunk k -> GPU k; returns (P, P, C, X) indexed by source GPU."""
        return buf.transpose(0, 1)  # (P_dst, P_src, C, X)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the same All2All on the gradient (fairseq/DeepSpeed)."""

    @staticmethod
    def forward(ctx, x, comm, hop):
        ctx.comm, ctx.hop = comm, hop
        return comm.exchange(x, hop)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.comm, ctx.hop), None, None


class DistComm:
    """One rank = one GPU = one expert. Tensors carry a leading device axis of size G = 1.

    PAPER: every rank holds one intra-node group (the M ranks of its node) and one inter-node
    group (the N ranks with its local index), built once with dist.new_group (Sec. "Bi-level
    Process Group Management"). The flat baseline uses the world group.
    It also times every exchange and counts its bytes (padded chunks, self-chunk excluded).
    """

    def __init__(self, N: int, M: int, groups: dict, device: torch.device):
        self.N, self.M, self.G = N, M, 1
        self.rank = dist.get_rank()
        self.device_ids = torch.tensor([self.rank], device=device)  # (1,)
        self.groups, self.device = groups, device
        self.reset_stats()

    def reset_stats(self):
        self.stats = {h: {"seconds": 0.0, "slow_bytes": 0, "fast_bytes": 0, "calls": 0}
                      for h in ("inter", "intra", "world")}

    def exchange(self, x: torch.Tensor, hop: str) -> torch.Tensor:
        """all_to_all_single over the hop's group; x (1, K, C, X) with K = that group's size."""
        inp = x[0].contiguous()  # (K, C, X): chunk k goes to the k-th rank of the group
        out = torch.empty_like(inp)  # (K, C, X): chunk k came from the k-th rank
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, inp, group=self.groups[hop])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        s = self.stats[hop]
        s["seconds"] += time.perf_counter() - t0
        s["calls"] += 1
        chunk = inp[0].numel() * inp.element_size()
        K = inp.shape[0]
        if hop == "inter":
            s["slow_bytes"] += (K - 1) * chunk
        elif hop == "intra":
            s["fast_bytes"] += (K - 1) * chunk
        else:  # world: the other GPUs of my node are fast, the rest slow
            s["fast_bytes"] += (self.M - 1) * chunk
            s["slow_bytes"] += (K - self.M) * chunk
        return out[None]  # (1, K, C, X)

    def inter(self, buf):
        return _AllToAll.apply(buf, self, "inter")

    def intra(self, buf):
        return _AllToAll.apply(buf, self, "intra")

    def world(self, buf):
        return _AllToAll.apply(buf, self, "world")


def make_bilevel_groups(N: int, M: int, timeout: datetime.timedelta) -> dict:
    """PAPER: rank r = node * M + local (torchrun's numbering). Creating a group is collective,
    so every rank creates every group, in the same order, and keeps the two it belongs to."""
    intra = [dist.new_group([n * M + m for m in range(M)], timeout=timeout) for n in range(N)]
    inter = [dist.new_group([n * M + m for n in range(N)], timeout=timeout) for m in range(M)]
    rank = dist.get_rank()
    return {"intra": intra[rank // M], "inter": inter[rank % M], "world": dist.group.WORLD}


# %% 7. Models: experts, the flat Switch layer, the SMILE layer, a tiny Transformer LM
class Experts(nn.Module):
    """E independent FFN experts (Linear D->H, GELU, Linear H->D) as stacked weights, so the E
    simulated GPUs run in one batched matmul. `localize(r)` keeps only expert r (one per rank)."""

    def __init__(self, E: int, D: int, H: int):
        super().__init__()
        b1, b2 = 1 / math.sqrt(D), 1 / math.sqrt(H)  # nn.Linear's init bounds
        self.w1 = nn.Parameter(torch.empty(E, D, H).uniform_(-b1, b1))  # (E, D, H)
        self.b1 = nn.Parameter(torch.empty(E, H).uniform_(-b1, b1))  # (E, H)
        self.w2 = nn.Parameter(torch.empty(E, H, D).uniform_(-b2, b2))  # (E, H, D)
        self.b2 = nn.Parameter(torch.empty(E, D).uniform_(-b2, b2))  # (E, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (E, slots, D), row e -> expert e
        h = F.gelu(torch.baddbmm(self.b1[:, None], x, self.w1))  # (E, slots, H)
        return torch.baddbmm(self.b2[:, None], h, self.w2)  # (E, slots, D)

    def localize(self, rank: int) -> None:
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, nn.Parameter(getattr(self, name).data[rank:rank + 1].clone()))


class DenseFFN(nn.Module):
    """The dense baseline: one FFN of the same width as one expert."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                 nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, comm, no_drop=False):  # x (G, T, D)
        return self.net(x), x.new_zeros(x.shape[0]), {}


class SwitchMoE(nn.Module):
    """Flat Switch top-1 routing over all E = N*M experts, one All2All over the world group."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.N, self.M = cfg.nodes, cfg.gpus_per_node
        self.E = self.N * self.M
        self.cf, self.alpha = cfg.cf, cfg.alpha
        self.w_router = nn.Linear(cfg.d_model, self.E, bias=False)
        self.experts = Experts(self.E, cfg.d_model, cfg.d_ff)

    def forward(self, x, comm, no_drop=False):
        """x (G, T, D) tokens of the G devices this process holds. Returns (y (G, T, D),
        lb (G,), stats)."""
        G, T, D = x.shape
        C = capacity(T, self.E, None if no_drop else self.cf)
        r = top1_route(self.w_router(x), C)  # dispatch (G, T, E, C)
        lb = load_balancing_loss(r.probs, r.expert, self.alpha)  # (G,)
        # PAPER: dispatch = einsum(sec, sm -> ecm), then one All2All over all P GPUs.
        send = torch.einsum("gtec,gtd->gecd", r.dispatch, x)  # (G, E, C, D)
        recv = comm.world(send)  # (G, P_src, C, D) at expert g
        out = self.experts(recv.reshape(G, -1, D)).reshape(recv.shape)  # (G, P_src, C, D)
        back = comm.world(out)  # (G, E, C, D) back at the source GPU
        # Switch Eq. (2): y = p_{i*}(x) E_{i*}(x); dropped tokens get 0 (the residual carries them)
        y = torch.einsum("gtec,gecd->gtd", r.combine, back)  # (G, T, D)
        stats = {"tokens": G * T, "dropped": (~r.keep).sum().item(),
                 "send_flat": r.dispatch.sum((1, 3)).detach(),  # (G, E) tokens to each expert
                 "load1": torch.bincount(r.expert.flatten() // self.M, minlength=self.N),  # (N,)
                 "load2": torch.bincount(r.expert.flatten() % self.M, minlength=self.M),  # (M,)
                 "load": r.dispatch.sum((0, 1, 3)).detach()}  # (E,) kept tokens per expert
        return y, lb, stats


class SmileMoE(nn.Module):
    """SMILE's bi-level layer: inter-node router -> inter All2All -> intra-node router ->
    intra All2All -> expert -> the two All2Alls in reverse -> combine with g1 * g2."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.N, self.M = cfg.nodes, cfg.gpus_per_node
        self.cf1, self.cf2 = cfg.cf1, cfg.cf2
        self.alpha1, self.alpha2 = cfg.alpha1, cfg.alpha2
        # PAPER: two small routers instead of one over N*M experts: N + M rows, not N*M.
        # PAPER [R]: one intra-node router W_gpu shared by all nodes (the fewest parameters);
        # --per-node-router gives every node its own (N*M rows, but each GPU uses only M).
        self.w_node = nn.Linear(cfg.d_model, self.N, bias=False)
        self.w_gpu = nn.Linear(cfg.d_model, self.M, bias=False)
        self.per_node = cfg.per_node_router
        if self.per_node:
            self.w_gpu_nodes = nn.Parameter(
                self.w_gpu.weight.data.repeat(self.N, 1, 1))  # (N, M, D), node n's router
            del self.w_gpu
        self.experts = Experts(self.N * self.M, cfg.d_model, cfg.d_ff)

    def forward(self, x, comm, no_drop=False):
        """x (G, T, D) tokens of the G devices this process holds. Returns (y (G, T, D),
        lb (G,) = level-1 term of the source GPU + level-2 term of the receiving GPU, stats)."""
        G, T, D = x.shape
        N, M = self.N, self.M
        # --- Level 1, on the source GPU (n_src, m): pick a node.
        # PAPER [R]: p1 = softmax(W_node x); C1 = ceil(cf1 * T / N) slots per destination node.
        C1 = capacity(T, N, None if no_drop else self.cf1)
        r1 = top1_route(self.w_node(x), C1)  # dispatch (G, T, N, C1)
        # PAPER [R]: additive LB loss, level-1 term over the source GPU's T tokens.
        lb1 = load_balancing_loss(r1.probs, r1.expert, self.alpha1)  # (G,)
        # DEVIATION: a ones column travels with each token and marks its slot as filled, so the
        # receiver can tell padding from tokens (never infer it from all-zero features). A real
        # system might exchange per-bucket counts instead; this keeps one exchange per hop.
        x_flag = torch.cat([x, x.new_ones(G, T, 1)], -1)  # (G, T, D + 1)
        send1 = torch.einsum("gtnc,gtx->gncx", r1.dispatch, x_flag)  # (G, N, C1, D + 1)
        # PAPER: the inter-node All2All among the N GPUs with my local rank: the only slow hop.
        recv1 = comm.inter(send1)  # (G, N_src, C1, D + 1), ordered by source node, then slot
        slots = recv1.reshape(G, N * C1, D + 1)  # (G, S, D + 1), S = N * C1
        valid = slots[..., -1] > 0.5  # (G, S)
        h = slots[..., :-1]  # (G, S, D)

        # --- Level 2, on the receiving GPU (n*, m): pick a GPU inside this node.
        # PAPER [R]: p2 = softmax(W_gpu x); C2 = ceil(cf2 * N * C1 / M) per destination GPU.
        C2 = capacity(N * C1, M, None if no_drop else self.cf2)
        if self.per_node:  # the router of the node this GPU sits in
            W = self.w_gpu_nodes[comm.device_ids // M]  # (G, M, D)
            logits2 = torch.einsum("gsd,gmd->gsm", h, W)  # (G, S, M)
        else:
            logits2 = self.w_gpu(h)  # (G, S, M)
        r2 = top1_route(logits2, C2, valid=valid)  # dispatch (G, S, M, C2)
        # PAPER [R]: level-2 term over the valid tokens this GPU received.
        lb2 = load_balancing_loss(r2.probs, r2.expert, self.alpha2, valid=valid)  # (G,)
        send2 = torch.einsum("gsmc,gsd->gmcd", r2.dispatch, h)  # (G, M, C2, D)
        # PAPER: the intra-node All2All among the M GPUs of this node (fast links).
        recv2 = comm.intra(send2)  # (G, M_src, C2, D) at expert (n*, m*)
        out = self.experts(recv2.reshape(G, M * C2, D)).reshape(recv2.shape)  # (G, M, C2, D)

        # --- Back the same way: intra All2All, combine with g2, inter All2All, combine with g1.
        back2 = comm.intra(out)  # (G, M, C2, D) at the level-2 router's GPU
        y_slots = torch.einsum("gsmc,gmcd->gsd", r2.combine, back2)  # (G, S, D), times g2
        back1 = comm.inter(y_slots.reshape(G, N, C1, D))  # (G, N, C1, D) at the source GPU
        # PAPER [R]: y = g1 * g2 * E_{n*, m*}(x); a token dropped at either level gets y = 0.
        y = torch.einsum("gtnc,gncd->gtd", r1.combine, back1)  # (G, T, D)

        # PLUMBING: diagnostics (no gradient). A token is dropped at level 1 on its source GPU or
        # at level 2 on the receiving GPU, never both, so the two counts add up.
        dropped = (~r1.keep).sum() + (valid & ~r2.keep).sum()
        node_of = comm.device_ids // M  # (G,) node of each receiving GPU
        expert_load = torch.zeros(N, M, device=x.device)  # (N, M) tokens reaching each expert
        expert_load.index_add_(0, node_of.to(x.device), r2.dispatch.sum((1, 3)).detach())
        stats = {"tokens": G * T, "dropped": dropped.item(),
                 "send_inter": r1.dispatch.sum((1, 3)).detach(),  # (G, N)
                 "send_intra": r2.dispatch.sum((1, 3)).detach(),  # (G, M)
                 "load1": torch.bincount(r1.expert.flatten(), minlength=N),  # (N,) argmax node
                 "load2": torch.bincount(r2.expert[valid], minlength=M),  # (M,) argmax GPU
                 "load": expert_load.flatten()}  # (E,) kept tokens per expert
        return y, lb1 + lb2, stats


class Block(nn.Module):
    """Pre-LN Transformer block; its FFN is dense, Switch or SMILE."""

    def __init__(self, cfg: Config, kind: str):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ffn = {"dense": DenseFFN, "switch": SwitchMoE, "smile": SmileMoE}[kind](cfg)

    def forward(self, x, comm, no_drop=False):  # x (B, L, D)
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, -1)  # 3 x (B, L, D)
        q, k, v = (t.reshape(B, L, self.n_heads, -1).transpose(1, 2)
                   for t in (q, k, v))  # (B, heads, L, D/heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, L, D/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))  # (B, L, D)
        # PLUMBING: the B*L tokens are split in order into G devices of T tokens each (whole
        # sequences per device, as data parallelism would place them).
        h = self.ln2(x).reshape(comm.G, -1, D)  # (G, T, D)
        y, lb, stats = self.ffn(h, comm, no_drop)
        return x + y.reshape(B, L, D), lb, stats  # (B, L, D): a dropped token keeps x


class TinyLM(nn.Module):
    def __init__(self, cfg: Config, kind: str):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.02)  # (L, D)
        self.blocks = nn.ModuleList(Block(cfg, kind) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, idx, comm, no_drop=False):
        """idx (B, L). Returns logits (B, L, V), lb (scalar: sum over layers, mean over the held
        devices), per-layer stats."""
        x = self.tok(idx) + self.pos[: idx.shape[1]]  # (B, L, D)
        lb, stats = 0.0, []
        for blk in self.blocks:
            x, lb_layer, st = blk(x, comm, no_drop)
            # PAPER: the model loss adds the LB losses of all MoE layers.
            lb = lb + lb_layer.mean()
            stats.append(st)
        return self.head(self.ln_f(x)), lb, stats


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; logits (B, L, V), targets (B, L)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# %% 8. Training (single process, simulated devices)
def _routing_summary(stats: list[dict], kind: str, N: int, M: int) -> dict:
    """PLUMBING: drop rate, per-level load fractions and message counts from one step's stats."""
    if kind == "dense":
        return {}
    tokens = sum(s["tokens"] for s in stats)
    out = {"drop": sum(s["dropped"] for s in stats) / tokens}
    load = torch.stack([s["load"].float() for s in stats]).sum(0)  # (E,)
    l1 = torch.stack([s["load1"].float() for s in stats]).sum(0)  # (N,)
    l2 = torch.stack([s["load2"].float() for s in stats]).sum(0)  # (M,)
    out["expert_load"] = (load / load.sum()).tolist()
    out["node_load"], out["gpu_load"] = (l1 / l1.sum()).tolist(), (l2 / l2.sum()).tolist()
    if kind == "smile":
        inter = message_counts(stats[-1]["send_inter"].cpu(), N, M, "inter")
        intra = message_counts(stats[-1]["send_intra"].cpu(), N, M, "intra")
        out["msgs"] = {"slow_msgs": inter["slow_msgs"], "slow_tokens": inter["slow_tokens"],
                       "fast_msgs": intra["fast_msgs"], "fast_tokens": intra["fast_tokens"]}
    else:
        out["msgs"] = message_counts(stats[-1]["send_flat"].cpu(), N, M, "flat")
    return out


@torch.no_grad()
def evaluate(model, comm, val, no_drop=True) -> float:
    """Mean validation cross-entropy; no token drops at eval unless no_drop=False."""
    # DEVIATION: eval capacity = all tokens (like fairseq's separate eval capacity), so the val
    # loss has no drop noise; train() also reports it at the training capacity factors.
    model.eval()
    losses = [lm_loss(model(x, comm, no_drop)[0], y).item() for x, y in val]
    model.train()
    return sum(losses) / len(losses)


def train_variant(cfg: Config, kind: str, tables, val, device) -> dict:
    """Train one variant (dense / switch / smile) on simulated devices; returns its history."""
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg, kind).to(device)
    comm = SimulatedComm(cfg.nodes, cfg.gpus_per_node)
    comm.device_ids = comm.device_ids.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)  # same batches for every variant
    hist = {"step": [], "loss": [], "lb": [], "val_step": [], "val": [], "drop": []}
    tail = []  # routing summaries of the last 10% of steps
    for step in tqdm(range(cfg.steps), desc=kind, leave=False, mininterval=1.0):
        x, y = (t.to(device) for t in sample_batch(tables, cfg.batch, cfg.seq_len, g))
        logits, lb, stats = model(x, comm)
        ce = lm_loss(logits, y)
        loss = ce + lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        info = _routing_summary(stats, kind, cfg.nodes, cfg.gpus_per_node)
        hist["step"].append(step)
        hist["loss"].append(ce.item())
        hist["lb"].append(float(lb.detach()))
        hist["drop"].append(info.get("drop", 0.0))
        if step >= cfg.steps - max(1, cfg.steps // 10):
            tail.append(info)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            v = evaluate(model, comm, val)
            hist["val_step"].append(step)
            hist["val"].append(v)
            tqdm.write(f"{kind:6s} step {step:4d} | loss {ce.item():.4f} "
                       f"| lb {float(lb.detach()):.4f} | drop {info.get('drop', 0.0):.3f} "
                       f"| val {v:.4f}")
    hist["final_val"] = hist["val"][-1]
    hist["final_val_train_cf"] = evaluate(model, comm, val, no_drop=False)
    if kind != "dense":
        def mean(key):
            return torch.tensor([t[key] for t in tail]).mean(0).tolist()
        hist["routing"] = {k: mean(k) for k in ("drop", "expert_load", "node_load", "gpu_load")}
        hist["routing"]["msgs"] = tail[-1]["msgs"]
    hist["n_params"] = sum(p.numel() for p in model.parameters())
    hist["router_rows"] = {"dense": 0, "switch": cfg.nodes * cfg.gpus_per_node,
                           "smile": cfg.nodes + cfg.gpus_per_node * (
                               cfg.nodes if cfg.per_node_router else 1)}[kind] * cfg.n_layers
    return hist


def comm_sweep(cfg: Config) -> dict:
    """PAPER [R]: the alpha-beta All2All time per GPU, flat vs SMILE, over N nodes at M = 8."""
    out = {}
    for T in (4096, 512):
        rows = [alltoall_cost(N, 8, T, 1024, 2, cfg.cf, cfg.cf1, cfg.cf2)
                for N in (2, 4, 8, 16, 32)]
        out[T] = {"N": [2, 4, 8, 16, 32], "rows": rows}
    return out


def train(cfg: Config) -> dict:
    """Train dense / Switch / SMILE on the same data, write summary.json and the plot."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if cfg.distributed:
        return train_distributed(cfg)
    t0 = time.time()
    set_seed(cfg.seed)
    device = torch.device(cfg.device)
    N, M = cfg.nodes, cfg.gpus_per_node
    tables = make_languages(cfg)
    gv = torch.Generator().manual_seed(cfg.seed + 1000)
    val = [tuple(t.to(device) for t in sample_batch(tables, cfg.batch, cfg.seq_len, gv))
           for _ in range(cfg.val_batches)]
    T = cfg.batch * cfg.seq_len // (N * M)
    print(f"SMILE toy: N={N} nodes x M={M} GPUs = {N * M} experts, T={T} tokens per GPU, "
          f"{cfg.steps} steps per variant")
    kinds = [k for k in VARIANTS if k in cfg.variants.split(",")]
    hists = {k: train_variant(cfg, k, tables, val, device) for k in kinds}
    sweep = comm_sweep(cfg)
    toy = alltoall_cost(N, M, T, cfg.d_model, 4, cfg.cf, cfg.cf1, cfg.cf2)

    metrics = {f"val_{k}": h["final_val"] for k, h in hists.items()}
    metrics.update({f"val_train_cf_{k}": h["final_val_train_cf"] for k, h in hists.items()})
    for k in ("switch", "smile"):
        if k in hists:
            r = hists[k]["routing"]
            metrics[f"drop_{k}"] = r["drop"]
            metrics[f"slow_msgs_real_{k}"] = r["msgs"]["slow_msgs"]
            metrics[f"slow_tokens_real_{k}"] = r["msgs"]["slow_tokens"]
            metrics[f"max_expert_load_{k}"] = max(r["expert_load"])
            metrics[f"router_rows_{k}"] = hists[k]["router_rows"]
    metrics["smile_node_load"] = hists["smile"]["routing"]["node_load"] if "smile" in hists else []
    metrics["smile_gpu_load"] = hists["smile"]["routing"]["gpu_load"] if "smile" in hists else []
    metrics["model_slow_msgs_flat"] = toy["flat_slow_msgs"]
    metrics["model_slow_msgs_smile"] = toy["smile_slow_msgs"]
    metrics["model_slow_bytes_flat"] = toy["flat_slow_bytes"]
    metrics["model_slow_bytes_smile"] = toy["smile_slow_bytes"]
    for T_ in sweep:
        for N_, row in zip(sweep[T_]["N"], sweep[T_]["rows"]):
            metrics[f"model_ratio_T{T_}_N{N_}"] = row["flat_time"] / row["smile_time"]

    headline = []
    if "smile" in hists and "switch" in hists:
        headline.append({"metric": "val loss", "higher_is_better": False,
                         "method": {"name": "SMILE", "value": hists["smile"]["final_val"]},
                         "baseline": {"name": "Switch", "value": hists["switch"]["final_val"]}})
        headline.append({"metric": "val loss at training capacity (drops on)",
                         "higher_is_better": False,
                         "method": {"name": "SMILE",
                                    "value": hists["smile"]["final_val_train_cf"]},
                         "baseline": {"name": "Switch",
                                      "value": hists["switch"]["final_val_train_cf"]}})
    if "smile" in hists and "dense" in hists:
        headline.append({"metric": "val loss", "higher_is_better": False,
                         "method": {"name": "SMILE", "value": hists["smile"]["final_val"]},
                         "baseline": {"name": "dense", "value": hists["dense"]["final_val"]}})
    if "smile" in hists and "switch" in hists:
        headline.append({"metric": "slow-network msgs/GPU (last batch)", "higher_is_better": False,
                         "method": {"name": "SMILE", "value": metrics["slow_msgs_real_smile"]},
                         "baseline": {"name": "Switch", "value": metrics["slow_msgs_real_switch"]}})
    r16 = sweep[512]["rows"][3]
    headline.append({"metric": "modelled All2All ms (N=16, M=8, T=512)", "higher_is_better": False,
                     "method": {"name": "SMILE", "value": 1e3 * r16["smile_time"]},
                     "baseline": {"name": "Switch", "value": 1e3 * r16["flat_time"]}})
    summary = {"folder": FOLDER, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
               "wall_seconds": time.time() - t0, "metrics": metrics, "headline": headline}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(hists, sweep, cfg, out / "smile.png")
    summary["wall_seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_report(hists, sweep, toy, cfg, T)
    print(f"wall time {summary['wall_seconds']:.1f} s; wrote {out / 'summary.json'} and "
          f"{out / 'smile.png'}")
    return {"history": hists, "metrics": metrics, "summary": summary}


def _print_report(hists, sweep, toy, cfg, T):
    """PLUMBING: the results tables."""
    N, M = cfg.nodes, cfg.gpus_per_node
    print("\n| variant | val loss | val loss @train cf | drop % | max expert load | "
          "per-node load | per-GPU load (level 2) |")
    print("|---|---|---|---|---|---|---|")
    for k, h in hists.items():
        r = h.get("routing")
        if r is None:
            print(f"| {k} | {h['final_val']:.4f} | {h['final_val_train_cf']:.4f} | - | - | - | - |")
            continue
        fmt = lambda v: " ".join(f"{x:.2f}" for x in v)  # noqa: E731
        print(f"| {k} | {h['final_val']:.4f} | {h['final_val_train_cf']:.4f} "
              f"| {100 * r['drop']:.1f} | {max(r['expert_load']):.3f} (uniform {1 / (N * M):.3f})"
              f" | {fmt(r['node_load'])} | {fmt(r['gpu_load']) if 'gpu_load' in r else '-'} |")
    print(f"\nMessages per GPU in one dispatch All2All, last training batch (N={N}, M={M}, "
          f"T={T}); padded-buffer model: flat {toy['flat_slow_msgs']} slow msgs of "
          f"{toy['flat_slow_bytes'] / max(1, toy['flat_slow_msgs']):.0f} B, SMILE "
          f"{toy['smile_slow_msgs']} of "
          f"{toy['smile_slow_bytes'] / max(1, toy['smile_slow_msgs']):.0f} B (slow bytes "
          f"{toy['flat_slow_bytes']:.0f} vs {toy['smile_slow_bytes']:.0f})")
    print("| variant | slow msgs | tokens over slow links | fast msgs | tokens over fast links |")
    print("|---|---|---|---|---|")
    for k in ("switch", "smile"):
        if k in hists:
            m = hists[k]["routing"]["msgs"]
            print(f"| {k} | {m['slow_msgs']:.2f} | {m['slow_tokens']:.1f} | {m['fast_msgs']:.2f} "
                  f"| {m['fast_tokens']:.1f} |")
    print("\nModelled All2All time per GPU [R] (M=8, d=1024, bf16): flat / SMILE")
    print("| N nodes | slow msgs flat -> SMILE | T=4096: flat ms | SMILE ms | ratio "
          "| T=512: flat ms | SMILE ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for i, N_ in enumerate(sweep[4096]["N"]):
        a, b = sweep[4096]["rows"][i], sweep[512]["rows"][i]
        print(f"| {N_} | {a['flat_slow_msgs']} -> {a['smile_slow_msgs']} "
              f"| {1e3 * a['flat_time']:.2f} | {1e3 * a['smile_time']:.2f} "
              f"| {a['flat_time'] / a['smile_time']:.2f} | {1e3 * b['flat_time']:.2f} "
              f"| {1e3 * b['smile_time']:.2f} | {b['flat_time'] / b['smile_time']:.2f} |")
    print("Inter-node bytes per GPU are the same for flat and SMILE; SMILE sends them in M times "
          "fewer, M times larger messages.")


# %% 9. The distributed path: the same layers over real process groups
def _dist_setup(cfg: Config, rank: int, world: int, local_rank: int, init_method: str):
    """PLUMBING: init the process group (with a timeout) and the bi-level groups."""
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    if cfg.device == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout)
    groups = make_bilevel_groups(cfg.nodes, cfg.gpus_per_node, timeout)
    return device, DistComm(cfg.nodes, cfg.gpus_per_node, groups, device)


def _reduce_replicated_grads(model: nn.Module) -> None:
    """Sum the gradients of the replicated (non-expert) parameters over all ranks."""
    ps = [p for n, p in model.named_parameters() if ".experts." not in n and p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in ps])  # (n_replicated,)
    dist.all_reduce(flat)
    for p, g in zip(ps, flat.split([p.numel() for p in ps])):
        p.grad.copy_(g.view_as(p))


def _grad_diff(model: nn.Module, ref: nn.Module, rank: int) -> float:
    """Largest |grad - reference grad|; a rank's expert row r is compared with the reference's."""
    diff = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        qg = q.grad[rank:rank + 1] if ".experts." in n else q.grad
        diff = max(diff, (p.grad - qg).abs().max().item())
    return diff


def distributed_worker(rank: int, world: int, local_rank: int, cfg: Config, init_method: str):
    """One rank of --distributed: trains each MoE variant with one expert per rank.

    The first step also runs the single-process simulation of the whole batch (same seed, same
    weights) and checks that this rank's logits and gradients match it.
    """
    torch.set_num_threads(1)
    device, comm = _dist_setup(cfg, rank, world, local_rank, init_method)
    N, M = cfg.nodes, cfg.gpus_per_node
    tables = make_languages(cfg)
    # DEVIATION: every rank draws the same global batch and keeps its own sequences, so the
    # distributed run sees exactly the single-process run's tokens (a real loader would shard).
    b = cfg.batch // world  # sequences of this rank
    gv = torch.Generator().manual_seed(cfg.seed + 1000)
    val = [tuple(t[rank * b:(rank + 1) * b].to(device)
                 for t in sample_batch(tables, cfg.batch, cfg.seq_len, gv))
           for _ in range(cfg.val_batches)]
    kinds = [k for k in VARIANTS if k in cfg.variants.split(",")]
    results = {}
    for kind in kinds:
        torch.manual_seed(cfg.seed)
        model = TinyLM(cfg, kind).to(device)
        ref = TinyLM(cfg, kind).to(device)
        ref.load_state_dict(model.state_dict())
        for blk in model.blocks:
            if hasattr(blk.ffn, "experts"):
                blk.ffn.experts.localize(rank)  # PAPER: this rank keeps only expert `rank`
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        times = {h: 0.0 for h in ("inter", "intra", "world")}
        nbytes = {"slow": 0, "fast": 0}
        step_s, n_timed, losses = 0.0, 0, []
        it = range(cfg.steps)
        if rank == 0:
            it = tqdm(it, desc=f"{kind} (rank 0)", leave=False, mininterval=1.0)
        for step in it:
            if step == 0 and rank == cfg.fail_rank:
                raise RuntimeError(f"deliberate failure (--fail-rank {rank})")
            xb, yb = sample_batch(tables, cfg.batch, cfg.seq_len, g)  # global batch, (B, L)
            x, y = xb[rank * b:(rank + 1) * b].to(device), yb[rank * b:(rank + 1) * b].to(device)
            comm.reset_stats()
            t0 = time.perf_counter()
            logits, lb, _ = model(x, comm)
            ce = lm_loss(logits, y)
            # The global loss is the mean over ranks of the per-rank losses; each rank
            # back-propagates its share, the All2All backward carries expert gradients, and the
            # replicated parameters' gradients are summed over ranks.
            opt.zero_grad(set_to_none=True)
            ((ce + lb) / world).backward()
            _reduce_replicated_grads(model)
            if step == 0:
                sim = SimulatedComm(N, M)
                sim.device_ids = sim.device_ids.to(device)
                ref_logits, ref_lb, _ = ref(xb.to(device), sim)
                (lm_loss(ref_logits, yb.to(device)) + ref_lb).backward()
                d = torch.tensor([(logits - ref_logits[rank * b:(rank + 1) * b]).abs().max().item(),
                                  _grad_diff(model, ref, rank)], device=device)
                dist.all_reduce(d, op=dist.ReduceOp.MAX)
                results[f"max_abs_diff_logits_{kind}"] = d[0].item()
                results[f"max_abs_diff_grads_{kind}"] = d[1].item()
                if rank == 0:
                    tqdm.write(f"{kind}: distributed vs single-process, first batch: max |logit "
                               f"diff| {d[0].item():.2e}, max |grad diff| {d[1].item():.2e}")
            opt.step()
            if step >= min(3, cfg.steps - 1):  # skip warm-up steps in the timing
                step_s += time.perf_counter() - t0
                n_timed += 1
                for h, s in comm.stats.items():
                    times[h] += s["seconds"]
                    nbytes["slow"] += s["slow_bytes"]
                    nbytes["fast"] += s["fast_bytes"]
            loss_t = torch.tensor([ce.item()], device=device)
            dist.all_reduce(loss_t)
            losses.append(loss_t.item() / world)
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                ms = {h: 1e3 * s["seconds"] for h, s in comm.stats.items()}
                tqdm.write(f"{kind:6s} step {step:4d} | loss {losses[-1]:.4f} | "
                           f"lb {float(lb.detach()):.4f} | a2a ms inter {ms['inter']:.2f} "
                           f"intra {ms['intra']:.2f} world {ms['world']:.2f}")
        v = torch.tensor([evaluate(model, comm, val)], device=device)
        dist.all_reduce(v)
        results[f"val_{kind}"] = v.item() / world
        results[f"loss_first_{kind}"], results[f"loss_last_{kind}"] = losses[0], losses[-1]
        per = max(1, n_timed)
        results[f"step_ms_{kind}"] = 1e3 * step_s / per
        for h in times:
            results[f"a2a_ms_{h}_{kind}"] = 1e3 * times[h] / per
        results[f"slow_bytes_per_step_{kind}"] = nbytes["slow"] / per
        results[f"fast_bytes_per_step_{kind}"] = nbytes["fast"] / per
    dist.barrier()
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "dist_rank0.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    return results


def _spawn_entry(rank: int, world: int, cfg: Config, init_method: str, err_dir: str):
    # PLUMBING: all "nodes" share this machine, so rank r uses local device r (cuda:r). A failing
    # rank leaves its error (with a time stamp) in err_dir: when one rank dies, the others fail
    # too ("connection closed"), and the parent should report the first error, not theirs.
    try:
        distributed_worker(rank, world, rank, cfg, init_method)
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        Path(err_dir, f"rank{rank}.txt").write_text(f"{time.time()!r}\nrank {rank}: {msg}")
        raise


def train_distributed(cfg: Config) -> dict:
    """Run --distributed: under torchrun use its ranks; otherwise spawn N*M local processes.

    A failed worker makes this raise (mp.spawn stops the others); collectives time out after
    cfg.dist_timeout seconds instead of hanging.
    """
    t0 = time.time()
    world = cfg.nodes * cfg.gpus_per_node
    env = _torchrun_env()
    if env is not None:  # torchrun: every process runs this; rank 0 writes the summary
        distributed_worker(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], cfg, "env://")
        if env["RANK"] != 0:
            return {}
    else:
        import torch.multiprocessing as mp

        if cfg.device == "cuda" and torch.cuda.device_count() < world:
            raise RunError(f"--device cuda without torchrun needs {world} visible GPUs "
                           f"(one per simulated GPU), found {torch.cuda.device_count()}")
        with tempfile.TemporaryDirectory() as tmp:
            init = f"file://{os.path.join(tmp, 'rendezvous')}"
            try:
                mp.spawn(_spawn_entry, args=(world, cfg, init, tmp), nprocs=world, join=True)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                errors = sorted(p.read_text().split("\n", 1) for p in Path(tmp).glob("rank*.txt"))
                first = errors[0][1] if errors else str(e).strip().splitlines()[-1]
                raise RunError(f"a distributed worker failed: {first}") from None
    res = json.loads((Path(cfg.out_dir) / "dist_rank0.json").read_text())
    kinds = [k for k in VARIANTS if k in cfg.variants.split(",")]
    headline = []
    if "smile" in kinds and "switch" in kinds:
        headline.append({"metric": "val loss (distributed)", "higher_is_better": False,
                         "method": {"name": "SMILE", "value": res["val_smile"]},
                         "baseline": {"name": "Switch", "value": res["val_switch"]}})
        headline.append({"metric": "slow-network bytes/step/GPU", "higher_is_better": False,
                         "method": {"name": "SMILE", "value": res["slow_bytes_per_step_smile"]},
                         "baseline": {"name": "Switch",
                                      "value": res["slow_bytes_per_step_switch"]}})
    summary = {"folder": FOLDER, "seed": cfg.seed, "config": dataclasses.asdict(cfg),
               "wall_seconds": time.time() - t0, "metrics": res, "headline": headline}
    (Path(cfg.out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    print(f"\n--distributed: {cfg.nodes} nodes x {cfg.gpus_per_node} GPUs, backend {backend}, "
          f"{cfg.steps} steps per variant (per-step means, warm-up steps excluded)")
    print("| variant | val loss | step ms | a2a ms inter | intra | world | "
          "slow KB/step/GPU | fast KB/step/GPU | max diff vs single process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in kinds:
        print(f"| {k} | {res[f'val_{k}']:.4f} | {res[f'step_ms_{k}']:.1f} "
              f"| {res[f'a2a_ms_inter_{k}']:.2f} | {res[f'a2a_ms_intra_{k}']:.2f} "
              f"| {res[f'a2a_ms_world_{k}']:.2f} | {res[f'slow_bytes_per_step_{k}'] / 1e3:.1f} "
              f"| {res[f'fast_bytes_per_step_{k}'] / 1e3:.1f} "
              f"| {max(res[f'max_abs_diff_logits_{k}'], res[f'max_abs_diff_grads_{k}']):.1e} |")
    print("(a2a times include forward and backward exchanges; on one CPU machine every 'link' is "
          "shared memory, so these times say nothing about a real network.)")
    return {"metrics": res, "summary": summary}


# %% 10. Plot
def plot(hists: dict, sweep: dict, cfg: Config, path: Path) -> None:
    """Three panels: val loss vs step, expert load, modelled All2All time vs number of nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"dense": "tab:gray", "switch": "tab:blue", "smile": "tab:red"}
    for k, h in hists.items():
        # step 0 (loss ~ log V) is left out so the gap between the variants is visible
        ax[0].plot(h["val_step"][1:], h["val"][1:], "o-", color=colors[k], label=f"{k} (val)")
    ax[0].set(xlabel="step", ylabel="validation cross-entropy (no drops)",
              title="(a) loss vs step")
    ax[0].legend()
    E = cfg.nodes * cfg.gpus_per_node
    for i, k in enumerate(k for k in ("switch", "smile") if k in hists):
        load = hists[k]["routing"]["expert_load"]
        ax[1].bar([e + 0.4 * i - 0.2 for e in range(E)], load, width=0.4, color=colors[k],
                  label=k)
    ax[1].axhline(1 / E, color="k", ls="--", lw=1, label="uniform")
    ax[1].set(xlabel="expert (node * M + GPU)", ylabel="fraction of tokens",
              title="(b) expert load, last 10% of steps")
    ax[1].legend()
    for T, ls in ((4096, "-"), (512, "--")):
        Ns = sweep[T]["N"]
        rows = sweep[T]["rows"]
        ax[2].plot(Ns, [1e3 * r["flat_time"] for r in rows], ls, color=colors["switch"],
                   marker="o", label=f"flat, T={T}")
        ax[2].plot(Ns, [1e3 * r["smile_time"] for r in rows], ls, color=colors["smile"],
                   marker="s", label=f"SMILE, T={T}")
    for N_, r in zip(sweep[512]["N"], sweep[512]["rows"]):
        ax[2].annotate(f"{r['flat_slow_msgs']}/{r['smile_slow_msgs']}",
                       (N_, 1e3 * r["flat_time"]), textcoords="offset points", xytext=(0, 6),
                       fontsize=7, ha="center")
    ax[2].set(xscale="log", xlabel="nodes N (M = 8 GPUs each)", ylabel="modelled ms [R]",
              title="(c) All2All time; labels: slow msgs flat/SMILE")
    ax[2].minorticks_off()
    ax[2].set_xticks(sweep[512]["N"], [str(n) for n in sweep[512]["N"]])
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# %% 11. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    torch.set_num_threads(1)
    try:
        return train(cfg)
    except RunError as e:
        raise SystemExit(f"{FOLDER}/train.py: error: {e}") from None


if __name__ == "__main__":
    main()
