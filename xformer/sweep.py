"""The stage-2 sweep behind the defaults of train.py, on the tuning seeds (never on seeds 0-4).

For each seed: the frozen parts and each model's stage 1 once (as train.py makes them), then stage 2
of every model at each learning rate of the grid for the full --stage2-steps (no early stopping),
scored every --eval-every steps on validation and test (the accuracy-against-compute figure).

    python xformer/sweep.py --seeds 100 101 102 --lrs 1e-3 3e-3 --out runs/xformer_sweep
    python xformer/sweep.py --plot runs/xformer_sweep      # the figure from the saved JSON

Each seed's results go to <out>/seed<S>.json as soon as that seed is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as xf  # noqa: E402


def sweep_seed(seed: int, lrs: list[float], steps: int, eval_every: int) -> dict:
    cfg = xf.Config(seed=seed, stage2_steps=steps, eval_every=eval_every, patience=10 ** 6,
                    skip_patch_check=True)
    xf.set_seed(cfg.seed)
    gen = xf.torch.Generator().manual_seed(cfg.seed)
    data = xf.make_dataset(cfg)
    enc = xf.pretrain_encoders(cfg, data, gen)
    out = {"seed": seed, "encoder_probes": xf.encoder_probes(enc, data, seed), "runs": {}}
    for name, _key, variant, lam, with_stage2 in xf.LADDER:
        if not with_stage2:
            continue
        cfg_m = dataclasses.replace(cfg, lambda_rec=cfg.lambda_rec if lam is None else lam)
        model, _ = xf.stage1(name, cfg_m, data, enc, variant, cfg.seed + 1)
        for lr in lrs:
            r = xf.stage2(name, model, dataclasses.replace(cfg_m, lr_stage2=lr), data, enc,
                          cfg.seed * 1000 + 500)
            out["runs"][f"{name} | lr {lr:g}"] = {
                "curve": r["history"]["curve"], "best_step": r["best_step"], "test": r["test"]}
            print(f"seed {seed} | {name} | lr {lr:g} | best step {r['best_step']} | "
                  f"test {r['test']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    p.add_argument("--stage2-steps", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--out", default="runs/xformer_sweep")
    args = p.parse_args()
    if any(s in range(5) for s in args.seeds):
        p.error("seeds 0-4 are the reported seeds; tune on 100-102")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import sklearn.linear_model  # noqa: F401  (load its BLAS before limiting the pools)
    from threadpoolctl import threadpool_limits

    xf.torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        for seed in args.seeds:
            res = sweep_seed(seed, args.lrs, args.stage2_steps, args.eval_every)
            (out / f"seed{seed}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
