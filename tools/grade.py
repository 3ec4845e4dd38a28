"""Grade a class: every student's copy of one folder, with the same tests, into a gradebook.

    python tools/grade.py submissions/ --folder smile            # -> submissions/gradebook.csv
    python tools/grade.py submissions/ --folder smile --csv grades.csv --timeout 300

`submissions/` holds one sub-folder per student, named after the student, each with that student's
copy of the folder: the bundle that `tools/make_exercises.py` wrote (`<student>/smile/train.py`),
just the file (`<student>/train.py`), or the paired notebook (`<student>/smile.ipynb`,
`<student>/smile/train.ipynb`), read with jupytext. Where both a .py and a notebook are there, the
newer of the two is graded and the gradebook says so.

Each coding exercise is graded on its own. For exercise N we take the reference `train.py`, put the
student's code of exercise N (what stands between its `# BEGIN SOLUTION (exercise N)` and
`# END SOLUTION` fences) in place of ours, and run the tests marked `exercise(N)` on it. So a
syntax error or a wrong answer in one exercise costs that exercise only, never the others, and code
outside the fences (which the student was told not to change) plays no part. A student's score for
an exercise is the share of its tests that pass (partial credit); the gradebook gives a short
reason for every failure. The tests come from this repo's `tests/`, never from the submission.

The student's code never runs in the process that decides pass or fail. The tests run in a pytest
process on the reference file (tools/grade_plugin.py); the functions that hold exercise N's
regions are answered by a worker process that imported the student's spliced file, on Linux inside
a bubblewrap sandbox (tools/grade_sandbox.py): no network, no view of the repository, the reference
solutions, TEACHER.md or other submissions, writes only to its own small scratch folder, and limits
on time, memory and processes. Without bubblewrap grade.py says in one line that grading is not
isolated, and keeps the separate process and the limits.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from grade_sandbox import IMPORT_SECONDS, Limits, isolation  # noqa: E402
from make_exercises import TEACHER_FILES, FenceError, region_spans  # noqa: E402


def regions(text: str) -> dict[int, list[str]]:
    """{exercise number: [the text inside each of its regions]}, fences excluded."""
    lines = text.splitlines(keepends=True)
    out: dict[int, list[str]] = {}
    for begin, end, n, _ in region_spans(lines):
        out.setdefault(n, []).append("".join(lines[begin + 1:end]))
    return out


def splice(reference: str, student: str, n: int, line_map: list | None = None) -> str:
    """The reference text with exercise n's region(s) taken from the student's text.

    If line_map is a list, one (first line in the result, first line in the student's text,
    number of lines) is appended to it per region: how to give an error's line in the student's
    own numbering."""
    try:
        theirs = regions(student).get(n)
        their_spans = [s for s in region_spans(student.splitlines(keepends=True)) if s[2] == n]
    except FenceError as e:
        raise ValueError(f"exercise {n}: the fences of this file are missing or changed "
                         f"({e})") from None
    lines = reference.splitlines(keepends=True)
    spans = [s for s in region_spans(lines) if s[2] == n]
    if theirs is None or len(theirs) != len(spans):
        raise ValueError(f"exercise {n}: the fences of this exercise are missing or changed")
    out, last, count = [], 0, 0
    for (begin, end, _, _), body, (sbegin, send, _, _) in zip(spans, theirs, their_spans):
        out += lines[last:begin + 1]
        count += begin + 1 - last
        out.append(body)
        if line_map is not None:
            line_map.append((count + 1, sbegin + 2, send - sbegin - 1))
        count += send - sbegin - 1
        last = end
    return "".join(out + lines[last:])


def region_functions(reference: str) -> dict[int, list[str]]:
    """{exercise: the functions (qualified names) that hold its regions} in the reference file.
    Student code runs only through these functions, so every region must sit inside one."""
    tree = ast.parse(reference)

    def enclosing(node, line, prefix):
        for child in ast.iter_child_nodes(node):
            if not (getattr(child, "lineno", 0) <= line <= getattr(child, "end_lineno", -1)):
                continue
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return prefix + [child.name]
            if isinstance(child, ast.ClassDef):
                return enclosing(child, line, prefix + [child.name])
            if isinstance(child, ast.stmt):
                return enclosing(child, line, prefix)
        return None

    out: dict[int, list[str]] = {}
    for begin, _, n, _ in region_spans(reference.splitlines(keepends=True)):
        path = enclosing(tree, begin + 1, [])
        if not path:
            raise ValueError(f"the region of exercise {n} (train.py, line {begin + 1}) is not "
                             "inside a function; grade.py runs student code through functions")
        key = ".".join(path)
        if key not in out.setdefault(n, []):
            out[n].append(key)
    return out


PY_NAMES = ("{f}/train.py", "train.py", "{f}/{f}/train.py")
NOTEBOOK_NAMES = ("{f}.ipynb", "{f}/train.ipynb", "{f}/{f}.ipynb", "{f}/{f}/train.ipynb",
                  "train.ipynb")


def find_submission(student_dir: Path, folder: str) -> tuple[Path | None, str]:
    """(the file to grade, a note for the gradebook): the student's train.py or paired notebook;
    if both are there, the newer one."""
    def first(names):
        return next((student_dir / n.format(f=folder) for n in names
                     if (student_dir / n.format(f=folder)).is_file()), None)

    py, nb = first(PY_NAMES), first(NOTEBOOK_NAMES)
    if py is None or nb is None:
        return py or nb, ""
    new, old = (nb, py) if nb.stat().st_mtime > py.stat().st_mtime else (py, nb)
    return new, (f"graded {new.relative_to(student_dir)}, newer than "
                 f"{old.relative_to(student_dir)}")


def submission_text(path: Path) -> str:
    """The text of a submission; a notebook as jupytext's py:percent text of its cells."""
    if path.suffix == ".ipynb":
        import jupytext
        try:
            nb = jupytext.reads(path.read_text(errors="replace"), fmt="ipynb")
            return jupytext.writes(nb, fmt="py:percent")
        except Exception as e:  # noqa: BLE001 -- any malformed notebook
            raise ValueError(f"the notebook {path.name} cannot be read "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
    return path.read_text(errors="replace")


def _copy_folder(ref_folder: Path, dest: Path, train_py: str) -> None:
    """The student's view of the folder: ours without the teacher notes, their spliced train.py;
    readable by the sandbox's unprivileged user."""
    shutil.copytree(ref_folder, dest, ignore=shutil.ignore_patterns(
        "__pycache__", "*.ipynb", ".ipynb_checkpoints", *TEACHER_FILES))
    (dest / "train.py").write_text(train_py)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)


def run_exercises(ref_folder: Path, test_file: Path, texts: dict[int, tuple[str, list]],
                  limits: Limits, work: Path, root: Path, hide: list[Path],
                  source: str = "train.py", runner: Runner | None = None) -> list[dict]:
    """Run the tests of the exercises in `texts` ({n: (spliced train.py, line map)}) in one
    grading process, each exercise's functions answered by its own worker. The report rows."""
    functions = region_functions((ref_folder / "train.py").read_text())
    bwrap, features, how = isolation(hide)
    spec = {"module": f"{ref_folder.name}.train", "limits": asdict(limits), "source": source,
            "hide": [str(h) for h in hide], "exercises": {},
            "isolation": [bwrap, sorted(features), how]}
    for n, (text, line_map) in texts.items():
        ex = work / f"ex{n}"
        ex.mkdir()
        _copy_folder(ref_folder, ex / "papers" / ref_folder.name, text)
        spec["exercises"][str(n)] = {"folder": str(ex / "papers" / ref_folder.name),
                                     "work": str(ex), "functions": functions[n],
                                     "line_map": line_map}
    (work / "spec.json").write_text(json.dumps(spec))
    report = work / "report.jsonl"
    env = {"PAPERS_DIR": str(ref_folder.parent), "GRADE_SPEC": str(work / "spec.json"),
           "GRADE_REPORT": str(report)}
    args = [str(test_file), "-p", "grade_plugin", "-q", "-p", "no:cacheprovider",
            "-p", "no:xdist", "-p", "no:randomly"]
    budget = (limits.timeout + IMPORT_SECONDS + 30) * len(texts) + 60
    rc, tail = (runner or Runner()).run(args, root, env, work / "pytest.log", budget)
    trouble = "" if rc in (0, 1) else \
        f"the grading process timed out after {budget:.0f} s" if rc is None else \
        f"the grading process ended with status {rc}: {tail}"
    rows = [json.loads(line) for line in report.read_text().splitlines()] \
        if report.is_file() else []
    if trouble:
        print(f"grade.py: {trouble}", file=sys.stderr)
        rows.append({"exercise": None, "test": "*", "outcome": "error", "reason": trouble,
                     "whole": True})
    return rows


TRUSTED_ENV = {"MPLBACKEND": "Agg", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class Runner:
    """Starts the grading pytest processes (which run no student code).

    On POSIX one server process imports the libraries the tests and the reference file import
    (torch takes seconds) once, and forks a fresh pytest process per student from that state:
    nothing of the repository is imported before the fork, so no student's run sees another's.
    Elsewhere each run is a new process."""

    def __init__(self, preload: list[str] | None = None):
        self.server = None
        if preload is not None and hasattr(os, "fork"):
            env = dict(os.environ, **TRUSTED_ENV, PYTHONPATH=os.pathsep.join(
                [str(TOOLS), os.environ.get("PYTHONPATH", "")]))
            self.server = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--fork-server",
                 json.dumps(preload)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                text=True)

    def run(self, args: list[str], cwd: Path, env: dict, log: Path, timeout: float
            ) -> tuple[int | None, str]:
        """(exit status, or None on timeout; the log's last line)."""
        rc: int | None
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.write(json.dumps({"args": args, "cwd": str(cwd), "env": env,
                                                "log": str(log), "timeout": timeout}) + "\n")
            self.server.stdin.flush()
            rc = json.loads(self.server.stdout.readline() or '{"rc": -1}')["rc"]
        else:
            full = dict(os.environ, **TRUSTED_ENV, **env, PYTHONPATH=os.pathsep.join(
                [str(TOOLS), os.environ.get("PYTHONPATH", "")]))
            with open(log, "w") as out:
                try:
                    rc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=cwd,
                                        env=full, stdout=out, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = None
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        return rc, (lines[-1] if lines else "")[:200]

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


def _fork_server(preload: list[str]) -> int:
    """The loop of Runner's server: import, then one forked pytest run per request line."""
    import importlib
    import signal
    import time
    reply = os.fdopen(os.dup(1), "w")  # the answers; anything a library prints goes to stderr
    os.dup2(2, 1)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- a library that fails here is imported later
            continue
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the grading process
            rc = 3
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = open(1, "w", closefd=False)
                os.chdir(req["cwd"])
                os.environ.update(req["env"])
                sys.dont_write_bytecode = True
                os.setsid()
                import pytest
                rc = int(pytest.main(req["args"]))
            except BaseException:  # noqa: BLE001
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(rc)
        end, rc = time.monotonic() + req["timeout"], None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > end:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        print(json.dumps({"rc": rc}), file=reply, flush=True)
    return 0


def preload_modules(paths: list[Path], hide: list[Path]) -> list[str]:
    """The installed libraries these files import at their top level (for Runner's server)."""
    import importlib.util

    from grade_sandbox import _inside, python_roots
    roots, names = python_roots(hide), ["pytest"]
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found = [node.module]
            else:
                continue
            for name in found:
                try:
                    spec = importlib.util.find_spec(name.split(".")[0])
                except (ImportError, ValueError):
                    continue
                origin = getattr(spec, "origin", None)
                if origin and any(_inside(Path(origin).resolve(), r) for r in roots) \
                        and name not in names:
                    names.append(name)
    return names


def score(rows: list[dict]) -> tuple[float, str]:
    """(share of tests passed, reason) for one exercise's report rows."""
    whole = [r for r in rows if r.get("whole")]
    if whole or not rows:
        return 0.0, whole[0]["reason"] if whole else "no test ran"
    passed = sum(r["outcome"] == "passed" for r in rows)
    failed = [r for r in rows if r["outcome"] != "passed"]
    reason = "" if not failed else f"{failed[0]['test']}: {failed[0]['reason']}"
    if len(failed) > 1:
        reason += f" (+{len(failed) - 1} more)"
    return passed / len(rows), reason


def grade_student(student_dir: Path, ref_folder: Path, test_file: Path, numbers: list[int],
                  limits: Limits, *, root: Path = ROOT, hide: list[Path] | None = None,
                  runner: Runner | None = None) -> dict[int, tuple[float, str]]:
    """{exercise: (score in [0, 1], reason)} for one student."""
    path, note = find_submission(student_dir, ref_folder.name)
    if path is None:
        return {n: (0.0, "no train.py or notebook in the submission") for n in numbers}
    try:
        student = submission_text(path)
    except ValueError as e:
        return {n: (0.0, str(e)) for n in numbers}
    reference = (ref_folder / "train.py").read_text()
    grades, texts = {}, {}
    for n in numbers:
        line_map: list = []
        try:
            texts[n] = (splice(reference, student, n, line_map), line_map)
        except ValueError as e:
            grades[n] = (0.0, str(e))
    if texts:
        source = "train.py" if path.suffix == ".py" else f"{path.name} as py:percent"
        with tempfile.TemporaryDirectory(prefix="grade-") as tmp:
            rows = run_exercises(ref_folder, test_file, texts, limits, Path(tmp), root,
                                 [*(hide or []), Path(tmp)], source, runner)
        broken = [r for r in rows if r.get("exercise") is None]
        for n in texts:
            grades[n] = score(broken or [r for r in rows if r.get("exercise") == n])
    if note:
        grades = {n: (s, f"{note}; {r}" if r else note) for n, (s, r) in grades.items()}
    return dict(sorted(grades.items()))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fork-server"]:
        return _fork_server(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("submissions", help="one sub-folder per student")
    p.add_argument("--folder", required=True,
                   help="the paper folder graded, e.g. smile (or a path to one)")
    p.add_argument("--csv", help="gradebook path (default: SUBMISSIONS/gradebook.csv)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per exercise per student")
    p.add_argument("--memory-mb", type=int, default=Limits.memory_mb,
                   help="address space a student's process may map (default: %(default)s)")
    p.add_argument("--processes", type=int, default=Limits.processes,
                   help="processes and threads a student's code may start (default: %(default)s)")
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
    try:
        region_functions((ref / "train.py").read_text())
    except ValueError as e:
        print(f"grade.py: error: {e}", file=sys.stderr)
        return 2
    hide = sorted({ROOT, root, subs.resolve(), ref.resolve()})
    bwrap, _, how = isolation(hide)
    if bwrap:
        print(f"grade.py: {how}")
    else:
        print(f"grade.py: warning: {how}", file=sys.stderr)
    limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb, processes=args.processes)
    runner = Runner(preload_modules([test_file, ref / "train.py"], hide))
    book = {}
    try:
        for s in students:
            print(f"grading {s.name} ...", flush=True)
            book[s.name] = grade_student(s, ref, test_file, numbers, limits, root=root,
                                         hide=hide, runner=runner)
    finally:
        runner.close()
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
