"""Example paper: L2-regularised logistic regression, the smallest folder that follows the contract.

This is not one of the ten papers. It is the template a new folder starts from (copy it, then
replace the toy and the method), and the fixture that `tests/test_repo.py` and `tests/test_tools.py`
run the conventions checks, `tools/run_all.py` and `tools/make_exercises.py` against.

Citation (stand-in): Cox, D. R. "The regression analysis of binary sequences", JRSS-B, 1958.
Implemented: Eq. (1) the logistic model, Eq. (2) the regularised negative log-likelihood.

The idea: a linear score w.x passed through a sigmoid gives a probability; we fit w by gradient
descent on the average negative log-likelihood plus an L2 penalty. The baseline predicts the
majority class. On a toy problem with a linear boundary the method wins by a wide margin.

Notation (paper -> code):
    x_i     X[i]        one input, (D,)
    y_i     y[i]        label in {0, 1}
    w       w           weights, (D,)
    lambda  lam         L2 strength
Dimensions: N examples, D features.

What the miniature leaves out: nothing; it is a template.

Run:   python tests/example/example_paper/train.py
Ends:  a table `metric | example (method) | majority (baseline)` with accuracy ~0.95 vs ~0.5.
"""

# %% 1. Imports
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FOLDER = "example_paper"


# %% 2. Config
# PLUMBING: one field per knob; the CLI is generated from these fields.
@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "random seed (same seed, same numbers)"})
    quick: bool = field(default=False, metadata={"help": "a run of a few seconds for tests"})
    out_dir: str = field(default=f"runs/{FOLDER}", metadata={"help": "where outputs go"})
    device: str = field(default="cpu", metadata={"help": "cpu only in this folder"})
    steps: int = field(default=300, metadata={"help": "gradient steps"})
    n: int = field(default=400, metadata={"help": "number of toy examples"})
    lr: float = field(default=0.5, metadata={"help": "learning rate"})
    lam: float = field(default=1e-3, metadata={"help": "L2 strength (paper: none)"})
    log_every: int = field(default=100, metadata={"help": "steps between log lines"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=30, n=100, log_every=10)
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
    for name in ("steps", "n", "log_every"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    return cfg


# %% 3. Seeding
def set_seed(seed: int) -> np.random.Generator:
    """PLUMBING: this file has one random source, a numpy Generator made from the seed."""
    return np.random.default_rng(seed)


# %% 4. Toy data
def make_dataset(cfg: Config, rng: np.random.Generator):
    """Two Gaussian blobs in 2-D, labels 0/1. Returns X (N, 2), y (N,)."""
    y = rng.integers(0, 2, size=cfg.n)  # (N,)
    X = rng.normal(size=(cfg.n, 2)) + 2.0 * (2 * y[:, None] - 1)  # (N, 2)
    return X, y


# %% 5. The paper's core
def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def logistic_loss(w, X, y, lam):
    """Eq. (2): L(w) = -1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] + lam/2 ||w||^2.

    Args: w (D,), X (N, D), y (N,) in {0, 1}, lam >= 0. Returns (loss: float, grad: (D,)).
    """
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: compute the regularised logistic loss and its gradient.
    # PAPER: Eq. (1), p_i = sigmoid(w . x_i)
    p = sigmoid(X @ w)  # (N,)
    eps = 1e-12
    loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) + 0.5 * lam * w @ w
    grad = X.T @ (p - y) / len(y) + lam * w  # (D,)
    # END SOLUTION
    return float(loss), grad


# %% 6. Training
def train(cfg: Config) -> dict:
    """Fit w, compare with the majority-class baseline, write summary.json. Returns the history."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t0 = time.time()
    rng = set_seed(cfg.seed)
    X, y = make_dataset(cfg, rng)
    w = np.zeros(X.shape[1])  # (D,)
    history = {"loss": []}
    for step in range(cfg.steps):
        loss, grad = logistic_loss(w, X, y, cfg.lam)
        w -= cfg.lr * grad
        history["loss"].append(loss)
        if step % cfg.log_every == 0:
            print(f"step {step:4d} | loss {loss:.4f}")
    acc = float(np.mean((X @ w > 0) == y))
    base = float(np.mean(y == np.bincount(y).argmax()))
    metrics = {"accuracy": acc, "majority_accuracy": base, "final_loss": history["loss"][-1]}
    summary = {
        "folder": FOLDER,
        "seed": cfg.seed,
        "config": dataclasses.asdict(cfg),
        "wall_seconds": time.time() - t0,
        "metrics": metrics,
        "headline": [
            {"metric": "accuracy", "higher_is_better": True,
             "method": {"name": "logistic", "value": acc},
             "baseline": {"name": "majority", "value": base}},
        ],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n| metric   | logistic | majority |\n| accuracy | {acc:.3f}    | {base:.3f}    |")
    return {"history": history, "metrics": metrics, "summary": summary}


# %% 7. Entry point
def main(argv=None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
