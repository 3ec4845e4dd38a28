"""The tuning-seed reports of vidla/README.md, read from runs under runs/tune/ (seeds 100-102 only).

    python vidla/tuning_report.py lr lr1e-3 lr2e-3 lr4e-3
        # the learning-rate grid: each rung's kept validation R@1 per lr and seed, and the lr the
        # README's rule picks for it (mean over seeds; < 0.01 apart is a tie -> 2e-3, else the
        # smaller lr; a winner at the edge of the grid is flagged)
    python vidla/tuning_report.py budget s900_tuned
        # the longer budget: each rung's kept step and validation R@1 per seed, and the
        # validation R@1-vs-steps figure averaged over the seeds
        # (written to vidla/assets/vidla_r1_vs_steps_900.png)

It reads each run's summary.json (`arms`: the lr each rung got, its validation curve, the step it
kept), so it reports what the runs did, not what their tags say.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vidla import train as V  # noqa: E402  (the ladder and clip lengths the runs used)

LADDER = V.LADDER
BUCKETS = tuple(V.BUCKETS)  # short, medium, long
TUNING_SEEDS = (100, 101, 102)
TIE = 0.01  # the README's rule: differences under this are ties
OLD_DEFAULT = 2e-3


def summaries(tags: list[str]) -> list[dict]:
    """Every tuning-seed summary.json under runs/tune/<tag>/vidla/ for the given tags."""
    out = []
    for tag in tags:
        for path in sorted((ROOT / "runs" / "tune" / tag / "vidla").glob("seed*/summary.json")):
            s = json.loads(path.read_text())
            if s["seed"] not in TUNING_SEEDS:
                raise SystemExit(f"{path}: seed {s['seed']} is not a tuning seed")
            s["tag"] = tag
            out.append(s)
    if not out:
        raise SystemExit(f"no vidla runs under runs/tune/{{{','.join(tags)}}}")
    return out


def choose(scores: dict) -> float:
    """The README's rule on {lr: mean score}: the best lr; a tie (< TIE below the best) keeps
    OLD_DEFAULT if it is tied, else the smallest tied lr."""
    top = max(scores.values())
    tied = sorted(lr for lr, v in scores.items() if v > top - TIE)
    return OLD_DEFAULT if OLD_DEFAULT in tied else tied[0]


def lr_report(tags: list[str]) -> None:
    runs = summaries(tags)
    val = defaultdict(dict)  # (rung, lr) -> {seed: val_R1}
    for s in runs:
        assert s["config"]["steps"] == 300, f"{s['tag']}: the lr grid is at the 300-step budget"
        for rung, arm in s["arms"].items():
            val[rung, arm["lr"]][s["seed"]] = arm["val_R1"]
    print("kept-checkpoint validation R@1 (mean over buckets) per rung and lr, seeds "
          + " / ".join(map(str, TUNING_SEEDS)) + " -> mean")
    for rung in LADDER:
        lrs = sorted(lr for r, lr in val if r == rung)
        scores = {}
        for lr in lrs:
            per_seed = val[rung, lr]
            if set(per_seed) != set(TUNING_SEEDS):
                print(f"  {rung:11s} lr {lr:.0e}: seeds {sorted(per_seed)} only, not scored")
                continue
            scores[lr] = float(np.mean([per_seed[s] for s in TUNING_SEEDS]))
            print(f"  {rung:11s} lr {lr:.0e}: "
                  + " / ".join(f"{per_seed[s]:.3f}" for s in TUNING_SEEDS)
                  + f" -> {scores[lr]:.3f}")
        if scores:
            pick = choose(scores)
            edge = pick in (min(scores), max(scores)) and len(scores) > 1
            print(f"  {rung:11s} picks lr {pick:.0e}"
                  + ("  <- AT THE EDGE of its grid: extend" if edge else " (inside its grid)"))


def best_until(arm: dict, step: int) -> float:
    """The best mean validation R@1 over the buckets among the checkpoints up to `step`."""
    return max(float(np.mean([p[b] for b in BUCKETS])) for p in arm["val_curve"]
               if p["step"] <= step)


def budget_report(tags: list[str], out: Path) -> None:
    runs = summaries(tags)
    curves = defaultdict(dict)  # rung -> {seed: arm}
    steps_of = {}
    for s in runs:
        steps_of[s["seed"]] = s["config"]["steps"]
        for rung, arm in s["arms"].items():
            curves[rung][s["seed"]] = arm
    print("rung        | lr    | kept step per seed | kept val R@1 per seed | best val R@1 within "
          "the first 300 steps (same run)")
    for rung in [r for r in LADDER if r in curves]:
        arms = curves[rung]
        seeds = sorted(arms)
        kept = " / ".join(str(arms[s]["best_step"]) for s in seeds)
        r1 = " / ".join(f"{arms[s]['val_R1']:.3f}" for s in seeds)
        early = " / ".join(f"{best_until(arms[s], 300):.3f}" for s in seeds)
        lrs = {arms[s]["lr"] for s in seeds}
        print(f"{rung:11s} | {'/'.join(f'{x:.0e}' for x in sorted(lrs))} | {kept} (seeds "
              f"{','.join(map(str, seeds))}) | {r1} | {early}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BUCKETS), figsize=(14, 4), sharey=True)
    for ax, bucket in zip(axes, BUCKETS):
        for rung in [r for r in LADDER if r in curves]:
            arms = curves[rung]
            seeds = sorted(arms)
            steps = [p["step"] for p in arms[seeds[0]]["val_curve"]]
            r1 = np.array([[p[bucket] for p in arms[s]["val_curve"]] for s in seeds])  # (S, E)
            line, = ax.plot(steps, r1.mean(0), lw=2,
                            label=f"{rung} (lr {arms[seeds[0]]['lr']:.0e})"
                            + " (method)" * (rung == "VidLA"))
            for row in r1:
                ax.plot(steps, row, lw=0.5, alpha=0.35, color=line.get_color())
            for s in seeds:  # each seed's kept checkpoint
                k = steps.index(arms[s]["best_step"])
                ax.plot(steps[k], r1[seeds.index(s), k], "o", ms=4, color=line.get_color())
        ax.axvline(300, color="grey", lw=0.8, ls="-.", label="default budget (300)")
        ax.set_title(bucket)
        ax.set_xlabel("training step (batch 32)")
        ax.set_ylabel("validation text->video R@1")
        ax.set_ylim(0, 1.05)
    axes[-1].legend(fontsize=7, loc="lower right")
    seeds = sorted(steps_of)
    fig.suptitle(f"Validation R@1 against steps, {max(steps_of.values())}-step budget, tuning "
                 f"seeds {', '.join(map(str, seeds))} (thick: mean over seeds; thin: each seed; "
                 "dots: each seed's kept checkpoint)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("lr", "budget"):
        raise SystemExit("usage: python vidla/tuning_report.py {lr|budget} TAG [TAG ...]")
    if argv[0] == "lr":
        lr_report(argv[1:])
    else:
        budget_report(argv[1:], ROOT / "vidla" / "assets" / "vidla_r1_vs_steps_900.png")


if __name__ == "__main__":
    main(sys.argv[1:])
