"""The per-model sweeps on the tuning seeds (never on seeds 0-4); README, "What was tuned".

Stage 2: for each seed, the frozen parts and each model's stage 1 once (as train.py makes them,
each model with its own STAGE1 setting), then stage 2 of every model at each learning rate of the
grid, stopped early on the validation split (--patience, default 8 evaluations) under a cap
(--stage2-steps, default 2400, the default run's). Every evaluation is kept (validation trained
readout; test trained readout and unseen question), so a shorter patience or a lower cap can be
replayed exactly from the same curve afterwards (`replay`): stopping earlier never changes the
steps before it. --stage2-run 1 gives a second stage-2 run from the same stage 1 (the spread).

Stage 1 (--stage1-grid): one stage-1 run per model and --stage1-lrs, scored at --checkpoints by
the count probe on the validation images (the choice) and the validation stage-1 loss.

    python xformer/sweep.py --stage1-grid --out runs/xformer_s1grid
    python xformer/sweep.py --analyse-stage1 runs/xformer_s1grid
    python xformer/sweep.py --seeds 100 101 102 --lrs 3e-3 1e-3 1e-2 --out runs/xformer_sweep
    python xformer/sweep.py --analyse runs/xformer_sweep --caps 1600 2400  # tables, the figure
    python xformer/sweep.py --tuned-lr --stage2-run 1 --out runs/xformer_spread
    python xformer/sweep.py --analyse-spread runs/xformer_sweep runs/xformer_spread

Each seed's results go to <out>/seed<S>.json after every stage-2 run (a rerun skips the runs
already there, so a grid can be extended with more --lrs or --models).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as xf  # noqa: E402

MODELS = {key: name for name, key, _v, _l, with_stage2 in xf.LADDER if with_stage2}
RUNGS = {rung[1]: rung for rung in xf.LADDER}  # key -> its LADDER rung


def sweep_seed(seed: int, lrs: list[float], models: list[str], steps: int, eval_every: int,
               patience: int, path: Path, stage1_steps: int, stage1_lr: float,
               stage2_run: int = 0, tuned_lr: bool = False) -> dict:
    cfg = xf.Config(seed=seed, stage2_steps=steps, eval_every=eval_every, patience=patience,
                    skip_patch_check=True, steps=stage1_steps, lr=stage1_lr)
    # each model's stage 1 as train.py runs it (0 = its own tuned setting), recorded per model
    s1 = {k: list(xf.stage1_setting(cfg, RUNGS[k][2])) for k in models}
    out = json.loads(path.read_text()) if path.exists() else {"seed": seed, "runs": {}}
    rec = out.setdefault("stage1", {})
    if "steps" in rec or any(rec.get(k, v) != v for k, v in s1.items()) or out.setdefault(
            "stage2_run", stage2_run) != stage2_run:
        raise SystemExit(f"{path} holds a sweep with stage 1 {rec} (stage-2 run "
                         f"{out['stage2_run']}); use another --out")
    rec.update(s1)
    if tuned_lr:  # each model at its own default stage-2 rate (train.py's LR_STAGE2) only
        lrs = sorted({xf.LR_STAGE2[RUNGS[k][2]] for k in models})
    todo = [(k, lr) for k in models for lr in lrs if f"{k} | lr {lr:g}" not in out["runs"]
            and (not tuned_lr or lr == xf.LR_STAGE2[RUNGS[k][2]])]
    if not todo:
        return out
    data, enc = xf.frozen_parts(cfg)
    out.setdefault("encoder_probes", xf.encoder_probes(enc, data, seed))
    # Stage 1 of every model first, then the grid with the learning rate outermost, so that an
    # interrupted sweep has given every model the same learning rates (equal effort).
    stage1 = {}
    for name, key, variant, lam, _ in (RUNGS[k] for k in models):  # in the order asked for
        if key in {k for k, _ in todo}:
            cfg_m = xf.model_config(cfg, variant, lam)  # its stage 1: s1[key], recorded above
            model, hist = xf.stage1(name, cfg_m, data, enc, variant, cfg.seed + 1)
            stage1[key] = (name, cfg_m, model)
            out.setdefault("probes", {})[key] = xf.evaluate_probe(model, enc, data, seed)
            out.setdefault("stage1_loss", {})[key] = sum(hist["total"][-10:]) / 10
    for lr in lrs:
        for key, (name, cfg_m, model) in stage1.items():
            if (key, lr) not in todo:
                continue
            t0 = time.process_time()
            r = xf.stage2(name, model, dataclasses.replace(cfg_m, lr_stage2=lr), data, enc,
                          cfg.seed * 1000 + 500 + stage2_run)
            out["runs"][f"{key} | lr {lr:g}"] = {
                "model": key, "lr": lr, "curve": r["history"]["curve"],
                "best_step": r["best_step"], "stopped_at": r["stopped_at"], "test": r["test"],
                "cap": steps, "patience": patience, "eval_every": eval_every,
                "cpu_s": time.process_time() - t0}
            print(f"seed {seed} | {name} | lr {lr:g} | best step {r['best_step']} | stopped "
                  f"{r['stopped_at']} | test {r['test']} | {time.process_time() - t0:.0f} CPU-s",
                  flush=True)
            path.write_text(json.dumps(out, indent=1))
    return out


def stage1_val_loss(model, enc: dict, data: dict, cfg, seed: int) -> float:
    """Mean stage-1 loss L_1 on the validation images (batches of cfg.batch, fixed MAE masks and
    hard negatives from a generator of its own: the torch random streams of training are
    untouched)."""
    gen = xf.torch.Generator().manual_seed(seed)
    val = data["val"]
    with xf.torch.no_grad():
        losses = [xf.stage1_loss(model, enc, val[i:i + cfg.batch], data, cfg, gen)["total"].item()
                  for i in range(0, max(1, len(val) - cfg.batch + 1), cfg.batch)]
    return sum(losses) / len(losses)


def stage1_grid_seed(seed: int, lrs: list[float], models: list[str], checkpoints: list[int],
                     path: Path) -> dict:
    """Stage 1 only, one run per (model, lr) to the last checkpoint; at every checkpoint the count
    probe on the validation images (trained on the training images: the choice criterion) and
    the stage-1 loss on the validation images (recorded, chooses nothing). Test images: unused."""
    out = json.loads(path.read_text()) if path.exists() else {"seed": seed, "runs": {}}
    todo = [(k, lr) for lr in lrs for k in models
            if f"{k} | lr {lr:g}" not in out["runs"]
            or out["runs"][f"{k} | lr {lr:g}"]["checkpoints"] != checkpoints]
    if not todo:
        return out
    cfg = xf.Config(seed=seed, skip_patch_check=True, steps=max(checkpoints))
    data, enc = xf.frozen_parts(cfg)
    for key, lr in todo:  # lr outermost: an interrupted grid has given every model the same lrs
        name, _, variant, lam, _ = RUNGS[key]
        cfg_m = xf.model_config(dataclasses.replace(cfg, lr=lr), variant, lam)  # steps: cfg's
        points, t0 = [], time.process_time()

        def score(step, model, cfg_m=cfg_m, points=points, t0=t0, name=name, lr=lr):
            if step not in checkpoints:
                return
            model.eval()
            probe = xf.evaluate_probe(model, enc, data, seed, split="val", tasks=("count",))
            loss = stage1_val_loss(model, enc, data, cfg_m, seed + 7)
            model.train()
            points.append((step, probe["count"], loss, time.process_time() - t0))
            print(f"seed {seed} | {name} | lr {lr:g} | step {step} | val count probe "
                  f"{probe['count']:.3f} | val loss {loss:.3f} | {time.process_time() - t0:.0f} "
                  "CPU-s", flush=True)

        xf.stage1(name, cfg_m, data, enc, variant, cfg.seed + 1, checkpoint_fn=score)
        out["runs"][f"{key} | lr {lr:g}"] = {"model": key, "lr": lr, "checkpoints": checkpoints,
                                            "points": points}
        path.write_text(json.dumps(out, indent=1))
    return out


# The stage-1 rule, written into the README before the grid ran: each model's (steps, lr) is the
# cell with the highest mean validation count probe over the tuning seeds; cells within
# STAGE1_TIE of it count as tied, and among them the one with the fewest steps (then the highest
# mean) wins. A winner at the longest checkpoint or at either end of the lr grid is an edge.
STAGE1_TIE = 0.01


def stage1_choice(cells: dict) -> tuple:
    """cells {(lr, step): mean validation count probe} of one model -> (lr, step) by the rule."""
    top = max(cells.values())
    tied = [c for c, v in cells.items() if v >= top - STAGE1_TIE]
    return min(tied, key=lambda c: (c[1], -cells[c]))


def analyse_stage1(folder: Path) -> dict:
    """Print the stage-1 grid (mean over seeds), each model's choice and its edges."""
    import numpy as np

    per = {}  # (model, lr, step) -> {seed: (probe, loss, cpu)}
    for path in sorted(folder.glob("**/stage1_seed*.json")):
        s = json.loads(path.read_text())
        for r in s["runs"].values():
            for step, probe, loss, cpu in r["points"]:
                per.setdefault((r["model"], r["lr"], step), {})[s["seed"]] = (probe, loss, cpu)
    seeds = sorted({s for v in per.values() for s in v})
    print(f"stage-1 grid, seeds {seeds}: mean validation count probe (val loss) per lr and step")
    choice = {}
    for key in MODELS:
        lrs = sorted({lr for k, lr, _ in per if k == key})
        steps = sorted({st for k, _, st in per if k == key})
        if not lrs:
            continue
        cells = {}
        print(f"| {MODELS[key]} | " + " | ".join(f"{st} steps" for st in steps) + " |")
        for lr in lrs:
            row = []
            for st in steps:
                v = per.get((key, lr, st), {})
                if len(v) < len(seeds):
                    row.append("incomplete")
                    continue
                cells[(lr, st)] = float(np.mean([x[0] for x in v.values()]))
                row.append(f"{cells[(lr, st)]:.3f} ({np.mean([x[1] for x in v.values()]):.2f})")
            print(f"| lr {lr:g} | " + " | ".join(row) + " |")
        if not cells:
            continue
        lr, st = stage1_choice(cells)
        cpu = np.mean([x[2] / stp for (k, _, stp), v in per.items() if k == key
                       for x in v.values()])
        edge = [w for w, at in (("longest steps", st == max(steps)),
                                ("lr grid", lr in (lrs[0], lrs[-1]))) if at]
        choice[key] = (lr, st)
        print(f"{MODELS[key]}: steps {st}, lr {lr:g} (val probe {cells[(lr, st)]:.3f}; "
              f"{cpu:.3f} CPU-s per step with the checkpoints)"
              + (f"  <- AT THE EDGE: {', '.join(edge)}" if edge else ""))
    return choice


def replay(curve: list, patience: int, cap: int, eval_every: int) -> dict:
    """What train.py's stage 2 would have chosen with this patience and cap: the earliest step
    with the best validation readout, stopping after `patience` evaluations without a gain.
    Returns the chosen evaluation (step, val, test trained, test question) and the last step run.
    """
    best, last = None, 0
    for step, val, test_tr, test_q in curve:
        if step > cap:
            break
        last = step
        if best is None or val > best[1]:
            best = (step, val, test_tr, test_q)
        elif step - best[0] >= patience * eval_every:
            break
    return {"step": best[0], "val": best[1], "trained": best[2], "question": best[3],
            "stopped_at": last}


def analyse(folder: Path, patiences=(3, 5, 8), caps=(1600, 2400)) -> dict:
    """Print every (model, lr) cell, choose each model's lr, replay patience and cap; save the
    accuracy-against-steps figure next to the JSON."""
    import numpy as np

    cells, seed_ids, probes = {}, set(), {}
    for path in sorted(folder.glob("**/seed*.json")):  # several parts may hold one seed
        s = json.loads(path.read_text())
        seed_ids.add(s["seed"])
        for key, pr in s.get("probes", {}).items():
            probes.setdefault(key, {})[s["seed"]] = (pr["count"], s["stage1_loss"][key])
        for r in s["runs"].values():
            cells.setdefault((r["model"], r["lr"]), {})[s["seed"]] = r
    seed_ids = sorted(seed_ids)
    seeds = seed_ids
    for key, per in probes.items():
        print(f"stage 1 of {key}: count probe {np.mean([v[0] for v in per.values()]):.3f}, "
              f"final loss {np.mean([v[1] for v in per.values()]):.3f} (seeds {sorted(per)})")
    print(f"seeds {seed_ids}; each cell: mean over seeds at the validation-chosen step "
          f"(patience {max(patiences)}, cap {max(caps)})")
    print("| model | lr | val trained | test trained | test question | chosen steps | stopped "
          "| CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    table, choice = {}, {}
    for (key, lr), per in sorted(cells.items()):
        if len(per) < len(seeds):
            print(f"| {key} | {lr:g} | incomplete ({sorted(per)}) |")
            continue
        reps = [replay(per[s]["curve"], max(patiences), max(caps), per[s]["eval_every"])
                for s in seed_ids]
        row = {k: float(np.mean([r[k] for r in reps])) for k in ("val", "trained", "question")}
        row["steps"] = [r["step"] for r in reps]
        row["stopped"] = [per[s]["stopped_at"] for s in seed_ids]
        row["cpu"] = float(np.sum([per[s]["cpu_s"] for s in seed_ids]))
        table[(key, lr)] = row
        print(f"| {key} | {lr:g} | {row['val']:.3f} | {row['trained']:.3f} | "
              f"{row['question']:.3f} | {row['steps']} | {row['stopped']} | {row['cpu']:.0f} |")
    # The rule, written before the sweep ran: each model's lr is the one with the highest mean
    # validation trained readout at its chosen step; within 0.005 the one that chose fewer steps.
    for key in MODELS:
        rows = {lr: r for (k, lr), r in table.items() if k == key}
        if not rows:
            continue
        top = max(r["val"] for r in rows.values())
        near = [lr for lr, r in rows.items() if r["val"] >= top - 0.005]
        lr = min(near, key=lambda x: (np.mean(rows[x]["steps"]), -rows[x]["val"]))
        grid = sorted(rows)
        edge = "  <- AT THE EDGE of the grid" if lr in (grid[0], grid[-1]) else ""
        choice[key] = lr
        print(f"{MODELS[key]}: lr {lr:g} (grid {[f'{g:g}' for g in grid]}){edge}")
    print("\npatience and cap, replayed at each model's chosen lr (mean over seeds: validation "
          "trained readout, test question; chosen steps; steps run)")
    replays = {}
    for key, lr in choice.items():
        per = cells[(key, lr)]
        for p in patiences:
            for cap in caps:
                reps = [replay(per[s]["curve"], p, cap, per[s]["eval_every"]) for s in seed_ids]
                replays[(key, p, cap)] = reps
                print(f"{MODELS[key]:>26} | patience {p} | cap {cap:4d} | val "
                      f"{np.mean([r['val'] for r in reps]):.3f} | question "
                      f"{np.mean([r['question'] for r in reps]):.3f} | trained "
                      f"{np.mean([r['trained'] for r in reps]):.3f} | steps "
                      f"{[r['step'] for r in reps]} | run {[r['stopped_at'] for r in reps]}")
    plot(cells, choice, seed_ids, folder / "xformer_sweep.png")
    return {"table": table, "choice": choice, "replays": replays}


def analyse_spread(first: Path, second: Path, caps=(1600, 2400)) -> None:
    """Two stage-2 runs (--stage2-run 0 and 1) of each model from the same stage 1, at the rates
    both folders hold: per seed the unseen question and the trained readout of each run at its
    validation-chosen step, replayed at each cap, and the largest difference per model."""
    def load(folder):
        cells = {}
        for path in sorted(folder.glob("**/seed*.json")):
            s = json.loads(path.read_text())
            for r in s["runs"].values():
                cells[(r["model"], r["lr"], s["seed"])] = r
        return cells

    a, b = load(first), load(second)
    for cap in caps:
        print(f"cap {cap}: model | lr | seed | question run 0, run 1 | trained run 0, run 1 "
              "| steps")
        worst = {}
        for key in sorted(set(a) & set(b)):
            ra, rb = (replay(c[key]["curve"], 8, cap, c[key]["eval_every"]) for c in (a, b))
            model, lr, seed = key
            d = abs(ra["question"] - rb["question"])
            worst[(model, lr)] = max(worst.get((model, lr), 0.0), d)
            print(f"{MODELS[model]} | {lr:g} | {seed} | {ra['question']:.3f}, {rb['question']:.3f} "
                  f"| {ra['trained']:.3f}, {rb['trained']:.3f} | {ra['step']}, {rb['step']}")
        for (model, lr), d in worst.items():
            print(f"cap {cap} | {MODELS[model]} | lr {lr:g} | largest question difference {d:.3f}"
                  f" -> {'representative' if d <= 0.05 else 'NOT representative'} (rule: 0.05)")


def plot(cells: dict, choice: dict, seed_ids: list, path: Path) -> None:
    """Test accuracy (unseen question, solid; trained readout, dashed) against stage-2 steps,
    one panel per model, one line per lr (mean over the tuning seeds), the chosen lr thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    all_lrs = sorted({lr for _, lr in cells})  # one colour per rate in every panel
    fig, axes = plt.subplots(1, len(MODELS), figsize=(4.2 * len(MODELS), 4), sharey=True)
    for ax, (key, name) in zip(axes, MODELS.items()):
        lrs = sorted(lr for (k, lr) in cells if k == key)
        for lr in lrs:
            per = cells[(key, lr)]
            if len(per) < len(seed_ids):
                continue
            longest = max((per[s]["curve"] for s in seed_ids), key=len)
            n, steps = len(longest), [c[0] for c in longest]

            def mean_at(col, per=per, n=n):  # a run that stopped carries its last value forward
                return [np.mean([per[s]["curve"][min(i, len(per[s]["curve"]) - 1)][col]
                                 for s in seed_ids]) for i in range(n)]

            chosen = choice.get(key) == lr
            c = plt.cm.viridis(all_lrs.index(lr) / max(1, len(all_lrs) - 1))
            ax.plot(steps, mean_at(3), color=c, lw=2.5 if chosen else 1,
                    label=f"lr {lr:g}" + (" (chosen)" if chosen else ""))
            ax.plot(steps, mean_at(2), color=c, lw=1, ls="--")
        ax.axhline(0.25, color="black", lw=0.8, ls=":")
        ax.set_title(name + (" (method)" if key == "xformer" else ""), fontsize=10)
        ax.set_xlabel("stage-2 step")
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes:
        ax.set_ylabel("count accuracy, test (mean of tuning seeds)")
    fig.suptitle("stage-2 sweep on the tuning seeds: solid = unseen question, dashed = trained "
                 "readout; a stopped run carries its last value", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-3, 1e-2])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--stage2-steps", type=int, default=xf.Config.stage2_steps)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--stage1-steps", type=int, default=xf.Config.steps,
                   help="stage-1 steps of every model (default 0: each model's, train.py's)")
    p.add_argument("--stage1-lr", type=float, default=xf.Config.lr,
                   help="stage-1 lr of every model (default 0: each model's, train.py's)")
    p.add_argument("--tuned-lr", action="store_true",
                   help="instead of --lrs: each model at its own default stage-2 rate")
    p.add_argument("--stage2-run", type=int, default=0,
                   help="which stage-2 run: seed*1000+500+k, train.py's k-th --stage2-seeds run "
                        "(a second k measures the spread of repeated stage-2 runs)")
    p.add_argument("--out", default="runs/xformer_sweep")
    p.add_argument("--analyse", metavar="DIR", help="analyse a finished sweep; run nothing")
    p.add_argument("--caps", type=int, nargs="+", default=[1600, 2400],
                   help="with --analyse: the caps to replay (the table uses the largest)")
    p.add_argument("--stage1-grid", action="store_true",
                   help="the stage-1 grid instead: stage 1 only, one run per model and "
                        "--stage1-lrs, scored at --checkpoints (validation count probe)")
    p.add_argument("--stage1-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--checkpoints", type=int, nargs="+", default=[60, 120, 180, 240, 300, 360])
    p.add_argument("--analyse-stage1", metavar="DIR", help="analyse a stage-1 grid; run nothing")
    p.add_argument("--analyse-spread", metavar="DIR", nargs=2,
                   help="compare stage-2 run 0 (first DIR) with run 1 (second); run nothing")
    args = p.parse_args()
    if args.analyse:
        analyse(Path(args.analyse), caps=tuple(args.caps))
        return
    if args.analyse_spread:
        analyse_spread(*map(Path, args.analyse_spread))
        return
    if args.analyse_stage1:
        analyse_stage1(Path(args.analyse_stage1))
        return
    if any(s in range(5) for s in args.seeds):
        p.error("seeds 0-4 are the reported seeds; tune on 100-102")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import sklearn.linear_model  # noqa: F401  (load its BLAS before limiting the pools)
    from threadpoolctl import threadpool_limits

    xf.torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        for seed in args.seeds:
            if args.stage1_grid:
                stage1_grid_seed(seed, args.stage1_lrs, args.models, sorted(args.checkpoints),
                                 out / f"stage1_seed{seed}.json")
                continue
            sweep_seed(seed, args.lrs, args.models, args.stage2_steps, args.eval_every,
                       args.patience, out / f"seed{seed}.json", args.stage1_steps, args.stage1_lr,
                       args.stage2_run, args.tuned_lr)


if __name__ == "__main__":
    main()
