"""pytest plugin for `test_planted_answers.py` (loaded as `-p planted_plugin`); not for direct use.

It grades the wrong answers of `planted_answers.py` the way tools/grade.py grades a student: for
each planted answer to exercise N of a folder, the answer's code goes into the reference file in
place of exercise N's region(s), and the tests marked `exercise(N)` run on it. To pay for torch
and the test modules' imports once, everything runs in this one pytest process: the spliced file is
executed as a fresh module, and the reference module's top-level functions and classes that hold
exercise N's regions are swapped for the spliced ones while those tests run (every other function
finds them through the module's globals). It writes {folder: {exercise: {answer: [passed, total,
first failure]}}} as JSON to $PLANTED_REPORT; the answer "<reference>" is the reference's own
region, graded the same way, which must pass everything.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import planted_answers  # noqa: E402
from grade import splice  # noqa: E402
from make_exercises import region_spans  # noqa: E402


def holders(text: str, n: int) -> list[str]:
    """Names of the top-level functions and classes that contain a region of exercise n."""
    lines = text.splitlines(keepends=True)
    spans = [(b + 1, e + 1) for b, e, k, _ in region_spans(lines) if k == n]
    names = []
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and any(
                node.lineno <= b and e <= node.end_lineno for b, e in spans):
            names.append(node.name)
    return names


def spliced_module(folder: str, text: str) -> types.ModuleType:
    mod = types.ModuleType(f"_planted_{folder}")
    mod.__file__ = str(ROOT / folder / "train.py")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up here
    exec(compile(text, mod.__file__, "exec"), mod.__dict__)
    return mod


def _exercise(item) -> int | None:
    mark = item.get_closest_marker("exercise")
    return int(mark.args[0]) if mark is not None and mark.args else None


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    report: dict = {}
    items_of: dict = {}
    for item in session.items:
        folder = Path(item.path).stem.removeprefix("test_")
        items_of.setdefault((folder, _exercise(item)), []).append(item)
    for folder, by_exercise in planted_answers.ANSWERS.items():
        path = ROOT / folder / "train.py"
        if folder == "example_paper":
            path = ROOT / "tests" / "example" / "example_paper" / "train.py"
        reference = path.read_text()
        real = importlib.import_module(f"{folder}.train")
        for n, answers in by_exercise.items():
            items = items_of.get((folder, n), [])
            for name, bodies in [("<reference>", None), *answers.items()]:
                student = (reference if bodies is None
                           else planted_answers.as_student_file(reference, n, bodies))
                mod = spliced_module(folder, splice(reference, student, n))
                saved = {h: getattr(real, h) for h in holders(reference, n)}
                passed, first = 0, ""
                try:
                    for h in saved:
                        setattr(real, h, getattr(mod, h))
                    for item in items:
                        reports = runtestprotocol(item, nextitem=None, log=False)
                        ok = all(r.passed or r.skipped for r in reports) and any(
                            r.when == "call" and r.passed for r in reports)
                        passed += ok
                        if not ok and not first:
                            bad = next(r for r in reports if r.failed)
                            first = f"{item.name}: {str(bad.longrepr).strip().splitlines()[-1]}"
                finally:
                    for h, obj in saved.items():
                        setattr(real, h, obj)
                report.setdefault(folder, {}).setdefault(str(n), {})[name] = [
                    passed, len(items), first]
    Path(os.environ["PLANTED_REPORT"]).write_text(json.dumps(report, indent=1))
    return True
