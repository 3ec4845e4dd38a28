"""pytest plugin used by tools/grade.py (loaded with `-p grade_plugin`); not for direct use.

It keeps only the tests marked `exercise(N)` for the exercise named in $GRADE_EXERCISE, and writes
one JSON line per test (and per collection error) to $GRADE_REPORT: outcome and a short reason.
"""

from __future__ import annotations

import json
import os
import re

import pytest


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
    return (lines[0] if lines else "failed")[:200]


def _write(record: dict) -> None:
    with open(os.environ["GRADE_REPORT"], "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collection_modifyitems(config, items):
    wanted = int(os.environ["GRADE_EXERCISE"])
    keep = [it for it in items if _exercise_of(it) == wanted]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


def pytest_collectreport(report):
    if report.failed:
        # Where in the student's file: the last "train.py", line N of the traceback.
        lines = re.findall(r'train\.py", line (\d+)', str(report.longrepr))
        where = f" (train.py, line {lines[-1]})" if lines else ""
        _write({"test": report.nodeid, "outcome": "error",
                "reason": "does not import: " + _short(report.longrepr) + where})


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome if report.when == "call" else "error"
        _write({"test": report.nodeid.split("::")[-1], "outcome": outcome,
                "reason": "" if report.passed else _short(report.longrepr)})
