"""Run every paper folder for seeds 0-4 and write the results the READMEs show.

    python tools/run_all.py                      # all ten folders, seeds 0-4 (about 1.5 hours)
    python tools/run_all.py --folders smile mico # just these; the other folders keep their results
    python tools/run_all.py --quick              # smoke check: --quick runs, no file is rewritten
    python tools/run_all.py --report-only        # rewrite the tables from the runs already made
    python tools/run_all.py --folders ecd --tune # tuning seeds 100-102 into runs/tune/; prints only
    python tools/run_all.py --folders ecd --tune --extra "--lr 1e-3" --tag lr1e-3   # a sweep point
    python tools/run_all.py --folders dreamblend --condition layout  # a named report condition

Defaults are chosen on the tuning seeds (100, 101, 102) and reported on seeds 0-4
(shared/EXPERIMENTS.md): `--tune` never rewrites a README, and the reports read only seeds 0-4
(or the `--seeds` given), so a tuning run can never leak into a reported table.

Each run is `python <folder>/train.py --seed S --out-dir runs/run_all/<folder>/seed<S>` from the
repo root, its output kept in `log.txt` beside its `summary.json`. Then, from every summary under
`runs/run_all/` (this call's and earlier calls'):

- `RESULTS.md`: per folder, each headline row as mean +- std over seeds (sample std), what the
  row claims (`expect`) and on how many seeds that held, and the CPU and wall time;
- each folder README: the same table between `<!-- results:start -->` and `<!-- results:end -->`;
- the root README: the index table between `<!-- index:start -->` and `<!-- index:end -->`.

A folder may also report a few named conditions beside its default command (CONDITIONS below,
e.g. the same method in a second toy world). Each is a fixed set of flags, so its numbers are as
reproducible as the default's: `--condition NAME` runs it into `runs/run_all/<folder>/<NAME>/`,
and its table goes into RESULTS.md (a `### <folder>, condition <NAME>` part of the folder's
section) and into the folder README between `<!-- results:NAME:start -->` and
`<!-- results:NAME:end -->`. The index always shows the default command.

These files are how README numbers are made; never type them by hand. Exits non-zero, naming the
runs, if any run failed (the tables are still written from the runs that worked).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from repo_checks import (  # noqa: E402
    LEVEL_TOL,
    PAPER_FOLDERS,
    RESULTS_END,
    RESULTS_START,
    behind,
    held,
    read_title,
)

INDEX_START, INDEX_END = "<!-- index:start -->", "<!-- index:end -->"

# Named report conditions: {folder: {name: the train.py flags that make it}}. Fixed here, not
# typed per call, so a --report-only rebuild and a reader both know what each table ran.
CONDITIONS: dict[str, dict[str, list[str]]] = {
    "dreamblend": {"colour": ["--world", "colour"]},
}


def condition_markers(name: str) -> tuple[str, str]:
    """The README markers of a condition's results block."""
    return f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"


def fmt(values: list[float]) -> str:
    """'mean ± std' over seeds; std is the sample std (0 for one seed)."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


def wins(row_per_seed: list[dict]) -> str:
    """On how many seeds the row held, per its `expect`; "-" for a report row.

    Two rules beyond the per-seed count (EXPERIMENTS.md, section 5): a `level` row whose method is
    behind on every seed held on none, whatever its margin says (a consistent deficit is not a
    tie); and a claim whose values are the same on every seed is a property of the design, not
    evidence, so it is flagged rather than counted.
    """
    results = [held(row) for row in row_per_seed]
    if any(r is None for r in results):
        return "-"
    n = len(results)
    values = {(r["method"]["value"], r["baseline"]["value"]) for r in row_per_seed}
    if n >= 3 and len(values) == 1:
        return f"{sum(results)}/{n} (constant over seeds: a report, not evidence)"
    if row_per_seed[0].get("expect") == "level" and n >= 2 and all(
            behind(r) for r in row_per_seed):
        return f"0/{n} (behind on every seed)"
    return f"{sum(results)}/{n}"


def runs_of(runs_dir: Path, folder: str, condition: str = "") -> Path:
    """Where a folder's runs live: runs_dir/<folder>/, a named condition's in <folder>/<NAME>/."""
    return runs_dir.joinpath(folder, *([condition] if condition else []))


def load_summaries(runs_dir: Path, folder: str, seeds=None, condition: str = "") -> list[dict]:
    """Every seed<k>/summary.json of one folder or one of its named conditions (only `seeds`, if
    given), in seed order."""
    out = []
    for path in sorted(runs_of(runs_dir, folder, condition).glob("seed*/summary.json"),
                       key=lambda p: int(p.parent.name[4:])):
        if seeds is not None and int(path.parent.name[4:]) not in seeds:
            continue
        summary = json.loads(path.read_text())
        meta = path.parent / "run.json"
        summary["_run"] = json.loads(meta.read_text()) if meta.exists() else {}
        if summary["_run"].get("returncode", 0) == 0:  # a failed run's stale summary is no result
            out.append(summary)
    return out


def wall_times(summaries: list[dict]) -> list[float]:
    """Each run's wall time: the whole command as run_all timed it, else train()'s own."""
    return [s["_run"].get("wall_seconds", s["wall_seconds"]) for s in summaries]


def cpu_seconds(summaries: list[dict]) -> list[float]:
    """Each run's CPU seconds (user + sys), where run_all recorded them."""
    return [s["_run"]["cpu_seconds"] for s in summaries if "cpu_seconds" in s["_run"]]


def cpu_time(summaries: list[dict]) -> str:
    """Mean CPU seconds per run, the number a loaded machine distorts least."""
    cpus = cpu_seconds(summaries)
    return f"{statistics.fmean(cpus):.0f} s" if cpus else "-"


def group_rows(summaries: list[dict]) -> dict[tuple, list[dict]]:
    """Headline rows matched across seeds by (metric, method, baseline), in first-seen order.

    A row that only some runs report (the folder's code changed between runs) is shown over the
    seeds that have it, never paired with another row.
    """
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        for row in s["headline"]:
            key = (row["metric"], row["method"]["name"], row["baseline"]["name"])
            groups.setdefault(key, []).append(row)
    return groups


def folder_table(summaries: list[dict], condition: str = "") -> list[str]:
    """Markdown table of a folder's headline rows over seeds (of a named condition, if given)."""
    seeds = [s["seed"] for s in summaries]
    lines = ["| metric | method | mean ± std | baseline | mean ± std | expect | held on |",
             "|---|---|---|---|---|---|---|"]
    for rows in group_rows(summaries).values():
        row = rows[0]
        arrow = "↑" if row["higher_is_better"] else "↓"
        record = wins(rows)
        lines.append(
            f"| {row['metric']} {arrow} | {row['method']['name']} "
            f"| {fmt([r['method']['value'] for r in rows])} | {row['baseline']['name']} "
            f"| {fmt([r['baseline']['value'] for r in rows])} | {row.get('expect', '?')} "
            f"| {record + ' seeds' if record != '-' else '- (not a claim)'} |")
    walls = wall_times(summaries)
    when = max((s["_run"].get("date", "") for s in summaries), default="")
    loads = [s["_run"]["load_avg"] for s in summaries if "load_avg" in s["_run"]]
    load = f", load average {statistics.fmean(loads):.1f} at the end of the runs" if loads else ""
    cpus = cpu_seconds(summaries)
    cpu = f"CPU time per run {fmt(cpus)} s, " if len(cpus) == len(summaries) else ""
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; {cpu}wall time per run {fmt(walls)} s "
              f"(the whole command, on {summaries[0]['_run'].get('machine', 'this machine')}"
              f"{load}); "
              f"run on {when or 'an unknown date'} by `python tools/run_all.py --folders "
              f"{summaries[0]['folder']}{' --condition ' + condition if condition else ''}`."]
    return lines


def first_sentence(text: str, limit: int = 160) -> str:
    """The index shows the claim's first sentence, cut at `limit` characters."""
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    text = m.group(1) if m else text
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def replace_between(text: str, start: str, end: str, body: list[str]) -> str:
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return text
    return pattern.sub(lambda _: "\n".join([start, *body, end]), text, count=1)


def write_reports(root: Path, runs_dir: Path, folders: list[str], seeds: list[int],
                  rewrite: set[str] | None = None) -> None:
    """RESULTS.md, each folder README's results block, the root README's index table.

    Only the folders in `rewrite` (all, if None) are recomputed from their runs; the others keep
    their section of RESULTS.md and their index row, and their README is left alone."""
    results = ["# Results", "",
               "Made by `python tools/run_all.py`; do not edit by hand. Each row: the method "
               "against its baseline on the toy's headline metric, mean ± sample std over "
               "seeds, what the row claims and on how many seeds that held\n(↑ higher is "
               "better, ↓ lower is better; `better`: the method should beat the baseline, "
               "`level`: a control, within the row's stated margin (else "
               f"{LEVEL_TOL:.0%}), and failed when the method is behind on every seed, "
               "`report`: a diagnostic, a property of the design or a reported negative, not a "
               "claim).", ""]
    index = ["| folder | paper | the idea | CPU time per run | headline (method vs baseline) "
             "| held on |", "|---|---|---|---|---|---|"]
    # A folder without runs here keeps what RESULTS.md and the index said of it: running some
    # folders must never erase the others' numbers (they were made by an earlier run_all).
    old_sections, old_rows = previous_reports(root)
    for folder in folders:
        fdir = root / folder
        if not fdir.is_dir():
            index.append(f"| `{folder}/` | - | not implemented yet | - | - | - |")
            continue
        readme = fdir / "README.md"
        title, claim = read_title(readme.read_text()) if readme.is_file() else ("", "")
        paper = title.split(":")[0] if title else folder
        claim = first_sentence(claim)
        summaries = load_summaries(runs_dir, folder, seeds)
        if rewrite is not None and folder not in rewrite and folder in old_sections:
            summaries = []
        if not summaries and folder in old_sections:
            results += old_sections[folder]
            index.append(old_rows.get(folder, f"| [`{folder}/`]({folder}/README.md) | {paper} "
                                               f"| {claim} | see RESULTS.md | - | - |"))
            continue
        if not summaries:
            index.append(f"| [`{folder}/`]({folder}/README.md) | {paper} | {claim} "
                         "| not run yet | - | - |")
            continue
        table = folder_table(summaries)
        results += [f"## {folder}: {paper}", "", *table, ""]
        if readme.is_file():
            readme.write_text(replace_between(readme.read_text(), RESULTS_START, RESULTS_END,
                                              table))
        for name, flags in CONDITIONS.get(folder, {}).items():
            results += condition_section(root, runs_dir, folder, name, flags, seeds,
                                         old_sections.get(folder, []))
        groups = list(group_rows(summaries).values())
        # The index shows the folder's first "better" row: its main claim, never a control.
        rows = next((g for g in groups if g[0].get("expect", "better") == "better"), groups[0])
        first = rows[0]
        index.append(
            f"| [`{folder}/`]({folder}/README.md) | {paper} | {claim} "
            f"| {cpu_time(summaries)} "
            f"| {first['metric']}: {first['method']['name']} "
            f"{fmt([r['method']['value'] for r in rows])} vs {first['baseline']['name']} "
            f"{fmt([r['baseline']['value'] for r in rows])} | {wins(rows)} |")
    (root / "RESULTS.md").write_text("\n".join(results).rstrip() + "\n")
    top = root / "README.md"
    if top.is_file():
        top.write_text(replace_between(top.read_text(), INDEX_START, INDEX_END, index))


def condition_section(root: Path, runs_dir: Path, folder: str, name: str, flags: list[str],
                      seeds: list[int], old_section: list[str]) -> list[str]:
    """RESULTS.md lines of one named condition (and its README block, rewritten), from its runs
    under runs_dir/<folder>/<name>/; without runs, what the last RESULTS.md said of it."""
    head = f"### {folder}, condition {name} (`{' '.join(flags)}`)"
    summaries = load_summaries(runs_dir, folder, seeds, condition=name)
    if not summaries:
        if head not in old_section:
            return []
        start = old_section.index(head)
        end = next((i for i in range(start + 1, len(old_section))
                    if old_section[i].startswith("### ")), len(old_section))
        return old_section[start:end]
    table = folder_table(summaries, condition=name)
    readme = root / folder / "README.md"
    if readme.is_file():
        readme.write_text(replace_between(readme.read_text(), *condition_markers(name), table))
    return [head, "", *table, ""]


def previous_reports(root: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What the last RESULTS.md and root README index said of each folder: its section's lines
    ({folder: lines}) and its index row ({folder: line})."""
    sections: dict[str, list[str]] = {}
    results = root / "RESULTS.md"
    if results.is_file():
        current = None
        for line in results.read_text().splitlines():
            m = re.match(r"^## ([\w-]+): ", line)
            if m:
                current = m.group(1)
                sections[current] = []
            if current is not None:
                sections[current].append(line)
    rows: dict[str, str] = {}
    top = root / "README.md"
    if top.is_file():
        for line in top.read_text().splitlines():
            m = re.match(r"^\| \[`([\w-]+)/`\]", line)
            if m:
                rows[m.group(1)] = line
    return sections, rows


def run_one(root: Path, folder: str, seed: int, out: Path, quick: bool, python: str,
            extra: list[str] = ()) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)  # never report a previous run's numbers
    cmd = [python, str(Path(folder) / "train.py"), "--seed", str(seed), "--out-dir", str(out)]
    if quick:
        cmd.append("--quick")
    cmd += list(extra)
    # The environment a student has (no thread variables forced): the CPU time we report is the
    # CPU time the plain command costs. Each main() picks its own torch thread count.
    env = dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / "log.txt", "w") as log:
        rc = subprocess.call(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time (user + system) of the run: unlike wall time, it hardly depends on other jobs.
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    meta = {"cmd": " ".join(cmd), "returncode": rc, "wall_seconds": time.time() - t0,
            "cpu_seconds": cpu,
            "date": dt.date.today().isoformat(), "load_avg": os.getloadavg()[0],
            "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}"}
    (out / "run.json").write_text(json.dumps(meta, indent=2))
    if rc == 0 and not (out / "summary.json").is_file():
        meta["returncode"] = "no summary.json"
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folders", nargs="+", help="folders to run (default: all that exist)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds to run and report (default: 0 1 2 3 4; with --tune: 100 101 102)")
    p.add_argument("--quick", action="store_true",
                   help="pass --quick, write to runs/run_all_quick, rewrite no README")
    p.add_argument("--tune", action="store_true",
                   help="tuning seeds 100 101 102 into runs/tune/<tag>; print, rewrite nothing")
    p.add_argument("--extra", default="", help='extra train.py flags, e.g. "--lr 1e-3"')
    p.add_argument("--tag", default="default", help="name of this sweep point under runs/tune/")
    p.add_argument("--condition", default="",
                   help="run a named report condition of the folders (see CONDITIONS) instead of "
                        "their default command")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing; rewrite RESULTS.md and the README tables from runs/run_all")
    p.add_argument("--root", default=str(ROOT), help="repo root (default: this repo)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [100, 101, 102] if args.tune else [0, 1, 2, 3, 4]
    if args.extra and not args.tune:
        p.error("--extra is for tuning sweeps (--tune); reported runs use the default command")
    root = Path(args.root).resolve()
    known = [f for f in PAPER_FOLDERS if (root / f).is_dir()]
    folders = args.folders or known
    if args.condition:
        lacking = [f for f in folders if args.condition not in CONDITIONS.get(f, {})]
        if lacking:
            print(f"run_all.py: error: no condition {args.condition!r} in {', '.join(lacking)} "
                  f"(conditions: {CONDITIONS})", file=sys.stderr)
            return 2
    missing = [f for f in folders if not (root / f / "train.py").is_file()]
    if missing:
        print(f"run_all.py: error: no train.py in {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.tune:
        runs_dir = root / "runs" / "tune" / re.sub(r"[^\w.=-]+", "_", args.tag)
    else:
        runs_dir = root / "runs" / ("run_all_quick" if args.quick else "run_all")
    jobs = [] if args.report_only else [(f, s) for f in folders for s in args.seeds]
    failed = []
    for k, (folder, seed) in enumerate(jobs, 1):
        out = runs_of(runs_dir, folder, args.condition) / f"seed{seed}"
        print(f"[{k}/{len(jobs)}] {folder}{' ' + args.condition if args.condition else ''} "
              f"seed {seed} ... ", end="", flush=True)
        flags = CONDITIONS[folder][args.condition] if args.condition else []
        meta = run_one(root, folder, seed, out, args.quick, args.python,
                       flags + args.extra.split())
        if meta["returncode"] == 0:
            print(f"ok ({meta['wall_seconds']:.1f} s)", flush=True)
        else:
            print(f"FAILED ({meta['returncode']}; see {out / 'log.txt'})", flush=True)
            failed.append(f"{folder} seed {seed}")
    if args.quick or args.tune:
        for folder in folders:
            summaries = load_summaries(runs_dir, folder, args.seeds, condition=args.condition)
            if summaries:
                print(f"\n{folder}\n" + "\n".join(folder_table(summaries)))
    else:
        ran = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
        report_folders = list(PAPER_FOLDERS) + [f for f in dict.fromkeys(folders + ran)
                                                if f not in PAPER_FOLDERS]
        write_reports(root, runs_dir, report_folders, args.seeds,
                      rewrite=None if args.report_only else set(folders))
        print(f"wrote {root / 'RESULTS.md'} and the README tables")
    if failed:
        print(f"run_all.py: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
