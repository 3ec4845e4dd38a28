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
import sys
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
            p.add_argument(flag, type=kind, default=f.default,
                           help=f.metadata["help"] + " (default: %(default)s)",
                           choices=DEVICES if f.name == "device" else None)
    cfg = Config(**vars(p.parse_args(argv)))
    if not 0 <= cfg.seed < 2**32:
        p.error(f"--seed must be in [0, 2**32), got {cfg.seed}")
    for name in ("steps", "n", "log_every"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
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
    # PAPER: Eq. (1), p_i = sigmoid(w . x_i)
    p = sigmoid(X @ w)  # (N,)
    # BEGIN SOLUTION (exercise 1)
    # Exercise 1: compute the regularised loss of Eq. (2) from p (a float, named `loss`).
    eps = 1e-12
    loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) + 0.5 * lam * w @ w
    # END SOLUTION
    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: compute the gradient of Eq. (2) with respect to w (shape (D,), named `grad`).
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
            {"metric": "accuracy", "higher_is_better": True, "expect": "better",
             "method": {"name": "logistic", "value": acc},
             "baseline": {"name": "majority", "value": base}},
        ],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n| metric   | logistic | majority |\n| accuracy | {acc:.3f}    | {base:.3f}    |")
    return {"history": history, "metrics": metrics, "summary": summary}


# %% 7. The run's last lines
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


# %% 8. Entry point
def main(argv=None) -> dict:
    if argv is None and in_notebook():
        argv = ["--quick"]  # PLUMBING: in a notebook, never parse the kernel's sys.argv
    cfg = parse_args(argv)
    t_start = time.time()
    out = prepare_out_dir(cfg.out_dir)  # before training: a bad --out-dir fails in a second
    result = train(cfg)
    print_verdict(result["summary"]["headline"], cfg.quick, out, t_start)
    return result


if __name__ == "__main__":
    main()
