"""pytest plugin used by tools/grade.py (loaded with `-p grade_plugin`); not for direct use.

This pytest process is the grader: it imports the *reference* train.py and runs the tests marked
`exercise(N)` for the exercises named in the spec ($GRADE_SPEC, a JSON file grade.py writes). No
student code runs here. The functions that hold exercise N's solution region(s) get a stub body
(their `__code__` is swapped, so every caller reaches it, including other reference functions):
while a test of exercise N runs, the stub sends the call to that student's worker for exercise N
(tools/grade_sandbox.py: the student's spliced train.py in its own sandboxed process) and returns
the plain data that comes back; at any other time it runs the reference body. The assertions, and
so pass or fail, happen here.

It writes one JSON line per test to $GRADE_REPORT: exercise, test, outcome and a short reason.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import types
from pathlib import Path

import pytest
from grade_sandbox import (
    GradingError,
    Limits,
    StudentCodeError,
    Worker,
    isolation,
    resolve_function,
)

_STATE: _Grading | None = None
_NODE_EXERCISE: dict[str, int] = {}  # test node id -> its exercise
FIRST_UID = 65534  # nobody; exercise i of a student runs as FIRST_UID - i (grader is root)


def _exercise_of(item) -> int | None:
    mark = item.get_closest_marker("exercise")
    return int(mark.args[0]) if mark is not None and mark.args else None


def _short(longrepr) -> str:
    """The last meaningful line of a failure: the exception, not the traceback."""
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        text = crash.message
    else:
        text = str(longrepr)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # prefer "E   SyntaxError: ..." style lines
        if ln.startswith("E "):
            return ln[1:].strip()[:200]
    if len(lines) > 1 and lines[0].endswith(":"):  # numpy's "AssertionError:" + what differs
        return f"{lines[0]} {lines[1]}"[:200]
    return (lines[0] if lines else "failed")[:200]


def _trampoline(func: types.FunctionType, key: str) -> types.CodeType:
    """A code object for func that hands (key, args, kwargs) to __grade_dispatch__, with the same
    free variables as func (a method that uses super() has one), so it can replace func's."""
    free = func.__code__.co_freevars
    src = ["def __outer__():"] + [f"    {v} = None" for v in free]
    src += [f"    def {func.__name__}(*args, **kwargs):"] + [f"        {v}" for v in free]
    src += [f"        return __grade_dispatch__({key!r}, args, kwargs)",
            f"    return {func.__name__}"]
    ns: dict = {}
    exec(compile("\n".join(src), func.__code__.co_filename, "exec"), ns)
    return ns["__outer__"]().__code__


class _Grading:
    def __init__(self, spec: dict):
        self.spec = spec
        isolation(known=spec["isolation"])  # found by grade.py; not probed again here
        self.module = spec["module"]
        limits = Limits(**spec["limits"])
        hide = [Path(p) for p in spec["hide"]]
        self.exercises = {int(n): e for n, e in spec["exercises"].items()}
        self.line_maps = {n: e.get("line_map", []) for n, e in self.exercises.items()}
        self.source = spec.get("source", "train.py")
        # One worker per exercise, each (when the grader is root) under its own unprivileged uid,
        # so one exercise's fork bomb does not use up the process limit of another.
        self.workers = {n: Worker(module=self.module, folder=Path(e["folder"]),
                                  work=Path(e["work"]), limits=limits, hide=hide,
                                  uid=FIRST_UID - i, where=functools.partial(self.where, n))
                        for i, (n, e) in enumerate(sorted(self.exercises.items()))}
        self.owner = {}  # function key -> exercises whose regions it holds
        for n, e in self.exercises.items():
            for key in e["functions"]:
                self.owner.setdefault(key, set()).add(n)
        self.originals: dict[str, types.FunctionType] = {}
        self.current: int | None = None

    def start(self) -> None:
        for w in self.workers.values():  # they import while pytest collects
            w.start()

    def install(self) -> None:
        mod = sys.modules.get(self.module)
        if mod is None:
            import importlib
            mod = importlib.import_module(self.module)
        mod.__grade_dispatch__ = self.dispatch
        for key in self.owner:
            func = resolve_function(mod, key)
            orig = types.FunctionType(func.__code__, func.__globals__, func.__name__,
                                      func.__defaults__, func.__closure__)
            orig.__kwdefaults__ = func.__kwdefaults__
            orig.__qualname__ = func.__qualname__
            self.originals[key] = orig
            func.__code__ = _trampoline(func, key)
            func.__defaults__ = func.__kwdefaults__ = None  # the body that runs has its own
            func.__globals__["__grade_dispatch__"] = self.dispatch

    def dispatch(self, key: str, args: tuple, kwargs: dict):
        n = self.current
        if n is not None and n in self.owner[key]:
            return self.workers[n].call(key, args, kwargs)
        return self.originals[key](*args, **kwargs)

    def enter(self, n: int) -> None:
        if n != self.current:
            if self.current is not None:
                self.workers[self.current].stop()  # tests run exercise by exercise
            self.current = n
        self.workers[n].wait_ready()

    def where(self, n: int | None, line: int) -> str:
        """' (train.py, line L)' in the student's own numbering where the line is theirs."""
        for spliced, theirs, count in self.line_maps.get(n, []):
            if spliced <= line < spliced + count:
                return f" ({self.source}, line {theirs + line - spliced})"
        return f" (line {line} of the reference train.py, outside your region)"

    def close(self) -> None:
        for w in self.workers.values():
            w.stop()


def pytest_configure(config):
    global _STATE
    if not os.environ.get("GRADE_SPEC"):
        return
    _STATE = _Grading(json.loads(Path(os.environ["GRADE_SPEC"]).read_text()))
    _STATE.start()


def pytest_unconfigure(config):
    if _STATE is not None:
        _STATE.close()


def pytest_collection_modifyitems(config, items):
    if _STATE is None:
        return
    keep = sorted((it for it in items if _exercise_of(it) in _STATE.exercises),
                  key=_exercise_of)  # stable: in file order within each exercise
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep
    _NODE_EXERCISE.update({it.nodeid: _exercise_of(it) for it in keep})
    _STATE.install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _STATE is not None:
        _STATE.enter(_exercise_of(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    exc = call.excinfo.value if call.excinfo is not None else None
    if _STATE is not None and exc is not None:
        where = getattr(exc, "__grade_where__", None)
        if isinstance(exc, GradingError):
            report.grade_reason, report.grade_whole = str(exc), exc.whole
        elif isinstance(exc, StudentCodeError):
            report.grade_reason = str(exc)
        elif where is not None:
            report.grade_reason = f"{type(exc).__name__}: {exc}"
        if where is not None:
            reason = getattr(report, "grade_reason", "")
            report.grade_reason = reason[:200] + _STATE.where(_exercise_of(item), where)
    return report


def _write(record: dict) -> None:
    with open(os.environ["GRADE_REPORT"], "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    if _STATE is not None and report.failed:  # the tests themselves: the teacher's side
        _write({"exercise": None, "test": report.nodeid, "outcome": "error",
                "reason": "the tests do not import (not the student's fault): "
                          + _short(report.longrepr)})


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if _STATE is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" else "error"
        reason = "" if report.passed else (getattr(report, "grade_reason", None)
                                           or _short(report.longrepr))
        _write({"exercise": _NODE_EXERCISE.get(report.nodeid),
                "test": report.nodeid.split("::")[-1], "outcome": outcome, "reason": reason,
                "whole": bool(getattr(report, "grade_whole", False))})


def pytest_report_header(config):
    if _STATE is not None:
        return f"grading: {isolation()[2]}"
