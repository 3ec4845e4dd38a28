"""Each method's metric against its training compute, over the seeds of tools/run_all.py.

Reads runs/run_all/dreamblend/seed*/summary.json (written by `python tools/run_all.py --folders
dreamblend`, the layout world; the colour world's are under runs/run_all/dreamblend/colour/, pass
them with --runs) and draws, for the per-image success, prompt fidelity and subject fidelity, every
single checkpoint against its fine-tuning steps (mean +- std over the seeds) and the DreamBlend
variants at the steps they need (the late checkpoint's; they also use the early one). Inference
cost is not on this axis: a plain checkpoint takes 2 UNet forwards per DDIM step (CFG), guidance
adds a forward/backward and 1-5 line-search forwards per guided step (README, Deviations).

    python dreamblend/plot_compute.py [--runs runs/run_all/dreamblend] [--out PATH]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:  # this folder's train.py: its names for the worlds and the rows
    from dreamblend import train as db  # imported as a package (tests)
except ImportError:  # run as a script: `python dreamblend/plot_compute.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train as db


def load(runs: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(runs.glob("seed*/summary.json"))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/run_all/dreamblend")
    ap.add_argument("--out", default="dreamblend/assets/dreamblend_compute.png")
    args = ap.parse_args(argv)
    runs = load(Path(args.runs))
    if not runs:
        raise SystemExit(f"plot_compute.py: error: no seed*/summary.json under {args.runs!r} "
                         "(run `python tools/run_all.py --folders dreamblend` first)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = runs[0]["config"]
    steps = sorted({int(k.split("ckpt ")[1]) for k in runs[0]["metrics"]
                    if k.startswith("both/ckpt ")})
    world = cfg.get("world", "colour")
    ctx = db.WORLD_CONTEXT[world]
    blend = db.variants(db.Config(invert=cfg.get("invert", False)))[1]  # which row is DreamBlend
    panels = [("both", f"{ctx} and subject, per image"),
              ("prompt_fid", "prompt fidelity"), ("subject_fid", "subject fidelity")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, title) in zip(axes, panels):
        m = np.array([[r["metrics"][f"{key}/ckpt {s}"] for s in steps] for r in runs])
        ax.errorbar(steps, m.mean(0), m.std(0), fmt="o-", color="grey", capsize=3,
                    label="single checkpoint (fine-tuning steps)")
        for n, mk, dx in (("guidance alone", "^", 0), ("inversion alone (lambda=0)", "s", 8),
                          ("inversion + guidance", "D", 16), (db.TRANSPLANT, "x", 24)):
            v = np.array([r["metrics"][f"{key}/{n}"] for r in runs])
            ax.errorbar(cfg["steps"] + dx, v.mean(), v.std(), fmt=mk, capsize=3,
                        label=n + (" (DreamBlend)" if n == blend else ""))
        ax.set_xscale("symlog", linthresh=20)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"dreamblend, {world} world: metric against fine-tuning compute "
                 f"(mean +- std over seeds {', '.join(str(r['seed']) for r in runs)})", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
