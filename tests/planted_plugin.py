"""pytest plugin for `test_planted_answers.py` (loaded as `-p planted_plugin`); not for direct use.

It grades the wrong answers of `planted_answers.py` the way tools/grade.py grades a student: for
each planted answer to exercise N of a folder, the answer's code goes into the reference file in
place of exercise N's region(s), and the tests marked `exercise(N)` run on it. To pay for torch
and the test modules' imports once, everything runs in this one pytest process: the spliced file is
executed as a fresh module, and the reference module's functions that hold exercise N's regions
(tools/grade.py's `region_functions`: a method as `Class.method`) are swapped for the spliced ones
while those tests run; every other function finds them through the module's globals, and a class
keeps its identity. Each test runs with `nextitem=None`, so every fixture (module-scoped ones that
call exercise code included) is built afresh for it, as in grade.py's fresh process per exercise.
It writes {folder: {exercise: {answer: [passed, total, first failure, CPU seconds, names of the
tests passed]}}} as JSON to $PLANTED_REPORT; the answer "<reference>" is the reference's own
region, graded the same way, which must pass everything. $PLANTED_FOLDERS (comma-separated)
limits it to some folders. It grades ANSWERS and PENDING; with $PLANTED_PENDING, PENDING only
(for checking the stronger tests written for it).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

import pytest
from _pytest.runner import runtestprotocol

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import planted_answers  # noqa: E402
from grade import region_functions, splice  # noqa: E402


def holders(text: str, n: int) -> list[str]:
    """Qualified names of the functions (methods as `Class.method`) that hold exercise n's regions,
    as tools/grade.py finds them."""
    return region_functions(text).get(n, [])


def _owner(module, qualname: str):
    """(the object that holds the function, its attribute name): the module or a class in it."""
    *path, name = qualname.split(".")
    obj = module
    for part in path:
        obj = getattr(obj, part)
    return obj, name


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
    only = os.environ.get("PLANTED_FOLDERS")  # e.g. "smile,mico": grade those folders only
    table: dict = {}  # ANSWERS and PENDING together (an answer's name is unique in its exercise)
    for part in ([planted_answers.PENDING] if os.environ.get("PLANTED_PENDING") else
                 [planted_answers.ANSWERS, planted_answers.PENDING]):
        for folder, by_exercise in part.items():
            for n, answers in by_exercise.items():
                table.setdefault(folder, {}).setdefault(n, {}).update(answers)
    for folder, by_exercise in table.items():
        if only and folder not in only.split(","):
            continue
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
                # Only the functions (or methods) that hold the regions are swapped, so a class
                # keeps its identity (isinstance, subclasses, instances a fixture built).
                saved = {h: _owner(real, h)[0].__dict__[_owner(real, h)[1]]
                         for h in holders(reference, n)}
                passed, first, t0, names = 0, "", time.process_time(), []
                try:
                    for h in saved:
                        setattr(*_owner(real, h), _owner(mod, h)[0].__dict__[_owner(mod, h)[1]])
                    for item in items:
                        reports = runtestprotocol(item, nextitem=None, log=False)
                        ok = all(r.passed or r.skipped for r in reports) and any(
                            r.when == "call" and r.passed for r in reports)
                        passed += ok
                        names += [item.name] if ok else []
                        if not ok and not first:
                            bad = next(r for r in reports if r.failed)
                            first = f"{item.name}: {str(bad.longrepr).strip().splitlines()[-1]}"
                finally:
                    for h, obj in saved.items():
                        setattr(*_owner(real, h), obj)
                report.setdefault(folder, {}).setdefault(str(n), {})[name] = [
                    passed, len(items), first, round(time.process_time() - t0, 2), names]
    Path(os.environ["PLANTED_REPORT"]).write_text(json.dumps(report, indent=1))
    return True
