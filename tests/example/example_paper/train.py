"""Example paper: L2-regularised logistic regression, the smallest folder that follows the contract.

This is not one of the ten papers. It is the template a new folder starts from (copy it, then
replace the toy and the method), and the fixture that `tests/test_repo.py` and `tests/test_tools.py`
run the conventions checks, `tools/run_all.py` and `tools/make_exercises.py` against.

Citation (stand-in): Cox, D. R. "The regression analysis of binary sequences", JRSS-B, 1958.
Implemented: Eq. (1) the logistic model, Eq. (2) the regularised negative log-likelihood.

The idea: a linear score w.x passed through a sigmoid gives a probability; we fit w by gradient
descent on the average negative log-likelihood plus an L2 penalty. The baseline predicts the
majority class. On a toy problem with a linear boundary the method should come close to the best
any classifier can do (the Bayes rule), far above the majority class.

Reading map (the paper is section 3; read it first, next to the paper):
    sigmoid -> logistic_loss (Eqs. 1-2) -> gradient_step        section 3, The paper
    the `Try it` cell                                           runs them on four points
    make_dataset, bayes_accuracy (the premise)                  section 4
    majority_baseline                                           section 5
    train (the loop, early stopping on validation) -> report    section 6
    A first read may skip Config's knobs (section 2) and the Appendix (run plumbing, the same
    bytes in every folder).

Notation (paper -> code):
    x_i     X[i]        one input, (D,)
    y_i     y[i]        label in {0, 1}
    w       w           weights, (D,)
    lambda  lam         L2 strength
    eta     lr          step size
Dimensions: N examples, D features.

What the miniature leaves out: nothing; it is a template.

Run:   python tests/example/example_paper/train.py
Ends:  the premise rows, a table `metric | logistic (method) | majority | Bayes rule`, and one
       verdict line per claim.
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
from tqdm import tqdm

FOLDER = "example_paper"
# PLUMBING: inside Jupyter, sys.argv holds the kernel's arguments and figures show inline; the
# `Try it` cells run only there.
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
    steps: int = field(default=300, metadata={"help": "most gradient steps (validation stops "
                                                      "earlier)", "range": "[1, inf)"})
    n: int = field(default=400, metadata={"help": "number of toy examples (train+val+test)",
                                          "range": "[20, inf)"})
    sep: float = field(default=2.0, metadata={"help": "distance of each blob's mean from the "
                                                      "origin, per axis", "range": "[0, inf)"})
    lr: float = field(default=0.5, metadata={"help": "learning rate eta", "range": "(0, inf)"})
    lam: float = field(default=1e-3, metadata={"help": "L2 strength (paper: none)",
                                               "range": "[0, inf)"})
    log_every: int = field(default=100, metadata={"help": "steps between log lines",
                                                  "range": "[1, inf)"})


# What --quick changes (it wins over the defaults above).
QUICK = dict(steps=30, n=100, log_every=10)


def check_config(cfg: Config) -> str | None:
    """PLUMBING: rules that join two fields (the Appendix checks each field's own range)."""
    return None


# %% 3. The paper: the logistic model and its regularised likelihood
# PAPER: a linear score through a sigmoid is the probability of class 1. We fit w by gradient
# descent on the mean negative log-likelihood of Eq. (2).
def sigmoid(z):
    """PAPER: the logistic function, (any shape) -> same shape, values in (0, 1)."""
    return 1.0 / (1.0 + np.exp(-z))


def logistic_loss(w, X, y, lam):
    """PAPER: Eq. (2): L(w) = -1/N sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)] + lam/2 ||w||^2.

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


def gradient_step(w, X, y, lam, lr):
    """PAPER: one step of gradient descent, w <- w - eta * dL/dw. Returns (new w (D,), loss)."""
    loss, grad = logistic_loss(w, X, y, lam)
    return w - lr * grad, loss


# %% Try it: the loss and one step on four hand-made points (runs only in a notebook)
if IN_NOTEBOOK:
    X_try = np.array([[1.0, 1.0], [2.0, 0.5], [-1.0, -1.5], [-0.5, -2.0]])  # (4, 2)
    y_try = np.array([1.0, 1.0, 0.0, 0.0])  # (4,)
    w_try = np.zeros(2)  # (2,)
    for k in range(3):
        w_try, loss_try = gradient_step(w_try, X_try, y_try, lam=0.0, lr=1.0)
        print(f"step {k}: loss {loss_try:.4f} (log 2 = {math.log(2):.4f} at w = 0), w = {w_try}")


# %% 4. The toy world and the premise it must pose
def set_seed(seed: int) -> np.random.Generator:
    """PLUMBING: this file has one random source, a numpy Generator made from the seed."""
    return np.random.default_rng(seed)


def make_dataset(cfg: Config, rng: np.random.Generator) -> dict:
    """PLUMBING: two Gaussian blobs at -sep and +sep on both axes, labels 0/1, split 60/20/20.

    Returns {"train": (X, y), "val": (X, y), "test": (X, y)} with X (n, 2), y (n,).
    """
    y = rng.integers(0, 2, size=cfg.n)  # (N,)
    X = rng.normal(size=(cfg.n, 2)) + cfg.sep * (2 * y[:, None] - 1)  # (N, 2)
    a, b = int(0.6 * cfg.n), int(0.8 * cfg.n)
    return {"train": (X[:a], y[:a]), "val": (X[a:b], y[a:b]), "test": (X[b:], y[b:])}


def bayes_accuracy(sep: float) -> float:
    """The best accuracy any classifier can reach on this toy (the method's upper bound).

    The two class means are 2 * sep * sqrt(2) apart and the noise is unit Gaussian, so the Bayes
    rule errs with probability Phi(-sep * sqrt(2)).
    """
    return 0.5 * (1.0 + math.erf(sep))  # Phi(sep * sqrt(2)) = (1 + erf(sep)) / 2


# %% 5. Baselines
def majority_baseline(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """The rival that ignores the input: predict the training set's majority class."""
    return float(np.mean(y_test == np.bincount(y_train, minlength=2).argmax()))


# %% 6. Training and the report
def accuracy(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((X @ w > 0) == y))


def train(cfg: Config) -> dict:
    """Fit w with early stopping on the validation split; run the baseline. Returns the results."""
    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    t_start = time.time()
    rng = set_seed(cfg.seed)
    data = make_dataset(cfg, rng)
    (X, y), (X_val, y_val), (X_test, y_test) = data["train"], data["val"], data["test"]
    w = np.zeros(X.shape[1])  # (D,)
    best = {"val_loss": math.inf, "w": w, "step": 0}
    history = {"loss": [], "val_loss": []}
    for step in tqdm(range(1, cfg.steps + 1), desc="logistic", disable=None):
        w, loss = gradient_step(w, X, y, cfg.lam, cfg.lr)
        val_loss = logistic_loss(w, X_val, y_val, cfg.lam)[0]
        history["loss"].append(loss)
        history["val_loss"].append(val_loss)
        # PLUMBING: training length is a knob like lr: keep the step with the best validation loss.
        if val_loss < best["val_loss"]:
            best = {"val_loss": val_loss, "w": w, "step": step}
        if step % cfg.log_every == 0 or step == 1:
            print(f"step {step:4d} | loss {loss:.4f} | val loss {val_loss:.4f}")
    return {
        "cfg": cfg, "t_start": t_start, "history": history,
        "metrics": {"accuracy": accuracy(best["w"], X_test, y_test),
                    "majority_accuracy": majority_baseline(y, y_test),
                    "bayes_accuracy": bayes_accuracy(cfg.sep),
                    "best_step": best["step"], "final_loss": history["loss"][-1]},
        # What each compared arm got (EXPERIMENTS.md, section 7): a test checks this record.
        "arms": {"logistic": {"data": "train", "init": "zeros", "lr": cfg.lr, "lam": cfg.lam,
                              "steps": best["step"], "chosen_on": "val loss"},
                 "majority": {"data": "train labels", "init": "none", "steps": 0}},
    }


# The claims this run checks, in order; the first `better` row is the folder's headline.
CLAIMS = [
    dict(metric="test accuracy", higher_is_better=True, expect="better",
         method=("logistic", "accuracy"), baseline=("majority", "majority_accuracy")),
    dict(metric="test accuracy", higher_is_better=True, expect="level",
         method=("logistic", "accuracy"), baseline=("Bayes rule", "bayes_accuracy"),
         margin=0.05, margin_why="the test split's sampling error: 2 standard errors at 80 "
                                 "points and accuracy 0.95 is 0.05"),
]


def report(results: dict) -> dict:
    """The premise, the table, summary.json, the plot and the verdict. Returns the summary."""
    cfg, m = results["cfg"], results["metrics"]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    premise = [
        premise_row("Bayes accuracy - chance: a linear boundary has something to find",
                    m["bayes_accuracy"] - 0.5, ">=", 0.2),
        premise_row("Bayes accuracy (the method's upper bound)", m["bayes_accuracy"]),
    ]
    print_premise(premise)
    headline = headline_rows(CLAIMS, m)
    print(f"\n| metric | logistic (method) | majority | Bayes rule |\n|---|---|---|---|\n"
          f"| test accuracy | **{m['accuracy']:.3f}** | {m['majority_accuracy']:.3f} | "
          f"{m['bayes_accuracy']:.3f} |")
    plot(results["history"], m["best_step"], out)
    summary = write_summary(cfg, out, results["t_start"], m, headline, premise, results["arms"])
    print_verdict(headline, cfg.quick, out, results["t_start"])
    return summary


def plot(history: dict, best_step: int, out: Path) -> None:
    """PLUMBING: training and validation loss against steps, the chosen step marked."""
    import matplotlib

    if not IN_NOTEBOOK:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    steps = np.arange(1, len(history["loss"]) + 1)
    ax.plot(steps, history["loss"], label="train loss")
    ax.plot(steps, history["val_loss"], label="validation loss")
    ax.axvline(best_step, color="grey", linestyle=":", label=f"chosen step ({best_step})")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("loss, Eq. (2)")
    ax.set_title("logistic regression (the method)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=100)
    plt.show() if IN_NOTEBOOK else plt.close(fig)


# %% 7. Entry point
def main(argv=None) -> dict:
    cfg = parse_args(argv)
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
