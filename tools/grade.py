"""Grade a class: every student's copy of one folder, with the same tests, into a gradebook.

    python tools/grade.py submissions/ --folder smile            # -> submissions/gradebook.csv
    python tools/grade.py submissions/ --folder smile --csv grades.csv --timeout 300

`submissions/` holds one sub-folder per student, named after the student, each with that student's
copy of the folder: the bundle that `tools/make_exercises.py` wrote (`<student>/smile/train.py`)
or just the file (`<student>/train.py`).

Each coding exercise is graded on its own. For exercise N we take the reference `train.py`, put the
student's code of exercise N (what stands between its `# BEGIN SOLUTION (exercise N)` and
`# END SOLUTION` fences) in place of ours, and run the tests marked `exercise(N)` on it. So a
syntax error or a wrong answer in one exercise costs that exercise only, never the others, and code
outside the fences (which the student was told not to change) plays no part. A student's score for
an exercise is the share of its tests that pass (partial credit); the gradebook gives a short
reason for every failure. The tests come from this repo's `tests/`, never from the submission.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from make_exercises import FenceError, region_spans  # noqa: E402


def regions(text: str) -> dict[int, list[str]]:
    """{exercise number: [the text inside each of its regions]}, fences excluded."""
    lines = text.splitlines(keepends=True)
    out: dict[int, list[str]] = {}
    for begin, end, n, _ in region_spans(lines):
        out.setdefault(n, []).append("".join(lines[begin + 1:end]))
    return out


def splice(reference: str, student: str, n: int) -> str:
    """The reference text with exercise n's region(s) taken from the student's text."""
    try:
        theirs = regions(student).get(n)
    except FenceError as e:
        raise ValueError(f"exercise {n}: the fences of this file are missing or changed "
                         f"({e})") from None
    lines = reference.splitlines(keepends=True)
    spans = [s for s in region_spans(lines) if s[2] == n]
    if theirs is None or len(theirs) != len(spans):
        raise ValueError(f"exercise {n}: the fences of this exercise are missing or changed")
    out, last = [], 0
    for (begin, end, _, _), body in zip(spans, theirs):
        out += lines[last:begin + 1]
        out.append(body)
        last = end
    return "".join(out + lines[last:])


def find_submission(student_dir: Path, folder: str) -> Path | None:
    for cand in (student_dir / folder / "train.py", student_dir / "train.py",
                 student_dir / folder / folder / "train.py"):
        if cand.is_file():
            return cand
    return None


def run_tests(ref_folder: Path, text: str, test_file: Path, n: int, timeout: float) -> list[dict]:
    """Run exercise n's tests on a copy of the reference folder whose train.py is `text`."""
    with tempfile.TemporaryDirectory() as tmp:
        papers = Path(tmp) / "papers"
        shutil.copytree(ref_folder, papers / ref_folder.name,
                        ignore=shutil.ignore_patterns("__pycache__", "TEACHER.md"))
        (papers / ref_folder.name / "train.py").write_text(text)
        report = Path(tmp) / "report.jsonl"
        env = dict(os.environ, PAPERS_DIR=str(papers), GRADE_EXERCISE=str(n),
                   GRADE_REPORT=str(report), MPLBACKEND="Agg", TQDM_DISABLE="1",
                   HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(TOOLS), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "grade_plugin", "-q",
               "-p", "no:cacheprovider"]
        try:
            subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        except subprocess.TimeoutExpired:
            return [{"test": "*", "outcome": "error", "reason": f"timed out after {timeout:.0f} s"}]
        if not report.is_file():
            return []
        return [json.loads(line) for line in report.read_text().splitlines()]


def grade_student(student_dir: Path, ref_folder: Path, test_file: Path, numbers: list[int],
                  timeout: float) -> dict[int, tuple[float, str]]:
    """{exercise: (score in [0, 1], reason)} for one student."""
    path = find_submission(student_dir, ref_folder.name)
    if path is None:
        return {n: (0.0, "no train.py in the submission") for n in numbers}
    reference = (ref_folder / "train.py").read_text()
    student = path.read_text(errors="replace")
    grades = {}
    for n in numbers:
        try:
            text = splice(reference, student, n)
        except ValueError as e:
            grades[n] = (0.0, str(e))
            continue
        rows = run_tests(ref_folder, text, test_file, n, timeout)
        # A timeout or a file that does not import fails the exercise as a whole.
        whole = [r for r in rows if r["test"] == "*" or "does not import" in r["reason"]]
        tests = [r for r in rows if r not in whole]
        if whole or not tests:
            grades[n] = (0.0, whole[0]["reason"] if whole
                         else "no test ran (the file may not import)")
            continue
        passed = sum(r["outcome"] == "passed" for r in tests)
        failed = [r for r in tests if r["outcome"] != "passed"]
        reason = "" if not failed else f"{failed[0]['test']}: {failed[0]['reason']}"
        if len(failed) > 1:
            reason += f" (+{len(failed) - 1} more)"
        grades[n] = (passed / len(tests), reason)
    return grades


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("submissions", help="one sub-folder per student")
    p.add_argument("--folder", required=True,
                   help="the paper folder graded, e.g. smile (or a path to one)")
    p.add_argument("--csv", help="gradebook path (default: SUBMISSIONS/gradebook.csv)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per exercise per student")
    p.add_argument("--root", default=str(ROOT), help="repo root holding the reference folder")
    args = p.parse_args(argv)
    root, subs = Path(args.root).resolve(), Path(args.submissions)
    ref = root / args.folder
    if not (ref / "train.py").is_file() and (Path(args.folder) / "train.py").is_file():
        ref = Path(args.folder).resolve()
    if not (ref / "train.py").is_file():
        print(f"grade.py: error: no reference folder {ref}", file=sys.stderr)
        return 2
    test_file = next((c for c in (root / "tests" / f"test_{ref.name}.py",
                                  ref.parent / f"test_{ref.name}.py")
                      if c.is_file()), None)
    if test_file is None or not subs.is_dir():
        what = "no tests for " + ref.name if test_file is None else f"no folder {subs}"
        print(f"grade.py: error: {what}", file=sys.stderr)
        return 2
    numbers = sorted(regions((ref / "train.py").read_text()))
    students = sorted(d for d in subs.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not numbers or not students:
        print(f"grade.py: error: no {'exercises' if not numbers else 'students'} to grade",
              file=sys.stderr)
        return 2
    book = {}
    for s in students:
        print(f"grading {s.name} ...", flush=True)
        book[s.name] = grade_student(s, ref, test_file, numbers, args.timeout)
    out = Path(args.csv) if args.csv else subs / "gradebook.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student"] + [c for n in numbers for c in (f"ex{n}", f"ex{n}_reason")]
                   + ["total"])
        for name, g in book.items():
            w.writerow([name] + [c for n in numbers for c in (f"{g[n][0]:.2f}", g[n][1])]
                       + [f"{sum(v[0] for v in g.values()):.2f}"])
    width = max(len("student"), *(len(n) for n in book))
    print(f"\n{ref.name}: {len(book)} student(s), exercises {numbers}")
    print(f"{'student':<{width}}  " + "  ".join(f"ex{n:<4}" for n in numbers) + "  total")
    for name, g in book.items():
        cells = "  ".join(f"{g[n][0]:<6.2f}" for n in numbers)
        print(f"{name:<{width}}  {cells}  {sum(v[0] for v in g.values()):.2f}/{len(numbers)}")
        for n in numbers:
            if g[n][1]:
                reason = re.sub(r"\s+", " ", g[n][1])[:150]
                print(f"{'':<{width}}    ex{n}: {reason}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
