"""tools/grade.py against students who attack it: each attack, planted as a student's solution on
the template folder, scores 0 on its exercise with a one-line reason, and leaves the gradebook,
the repository and the other submissions as they were.

The class is graded once (a module fixture) in a copy of the repository in tmp_path, so every
destructive attack aims at copies. The attacks that only a sandbox can stop skip, saying so, where
bubblewrap is missing; the others run everywhere.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "tests" / "example" / "example_paper"
sys.path.insert(0, str(ROOT / "tools"))
import grade  # noqa: E402
import grade_sandbox  # noqa: E402
import make_exercises  # noqa: E402
from make_exercises import region_spans  # noqa: E402

pytestmark = pytest.mark.repo

BWRAP = grade_sandbox.isolation()[0]
needs_sandbox = pytest.mark.skipif(
    BWRAP is None, reason="bubblewrap (bwrap) is missing or cannot start here, so grading is not "
                          "isolated: install it (apt-get install bubblewrap) to run this attack")
TIMEOUT = 5  # seconds of calls per exercise: the infinite loop costs this much CPU
UIDS = range(65530, 65535)  # the workers' uids when the grader is root (tools/grade_plugin.py)

# Each attack replaces one region of an otherwise correct solution. Where an attack "works", its
# code goes on to compute the right answer, so an attack that got through would score 1, not 0.
RIGHT_LOSS = ("eps = 1e-12\n"
              "loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)) "
              "+ 0.5 * lam * w @ w\n")

ATTACKS = {
    # name: (exercise attacked, region code, needs the sandbox, what the reason says)
    "forger": (1, """
        # The issue's forgery, made stronger: append "passed" for every test to the grader's
        # report, wherever it can be found, and to every open file descriptor; then leave.
        import glob, json, os, re
        names = []
        test_file = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
        for path in [test_file, "REPO/tests/example/test_example_paper.py"]:
            try:
                names += re.findall(r"def (test_\\w+)", open(path).read())
            except OSError:
                pass
        rows = "".join(json.dumps({"exercise": e, "test": t, "outcome": "passed",
                                   "reason": "", "whole": False}) + "\\n"
                       for t in names or ["test_ex1"] for e in (1, 2))
        targets = [os.environ.get("GRADE_REPORT", "")]
        targets += glob.glob("/tmp/**/report.jsonl", recursive=True)
        for t in filter(None, targets):
            try:
                open(t, "a").write(rows)
            except OSError:
                pass
        for fd in range(3, 64):
            try:
                os.write(fd, rows.encode())
            except OSError:
                pass
        os._exit(0)
        """, True, "the student's"),
    "exiter": (1, """
        import os
        os._exit(0)
        """, False, "the student's code ended its process during logistic_loss() (exit status 0)"),
    "ref_loader": (1, """
        # Load the reference solution and return its answer.
        import importlib.util, pathlib, sys
        here = pathlib.Path(__file__).resolve()
        tried = [here.parents[k] / "example_paper" / "train.py" for k in range(1, 4)]
        tried += [pathlib.Path("REPO/tests/example/example_paper/train.py"),
                  pathlib.Path("REAL_REF")]
        errors = []
        for path in tried:
            try:
                if path.resolve() == here:
                    continue
                spec = importlib.util.spec_from_file_location("ref_copy", path)
                ref = sys.modules["ref_copy"] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(ref)
                if 'raise NotImplementedError("Exercise 1' in path.read_text():
                    continue
                loss = ref.logistic_loss(w, X, y, lam)[0]
                break
            except Exception as e:
                errors.append(e)
        else:
            raise OSError(f"no reference solution in reach: {errors[-1]}")
        """, True, "no reference solution in reach: [Errno 2] No such file or directory"),
    "notes_reader": (1, """
        # The teacher notes hold the answers: read them, then answer.
        import pathlib
        notes = [pathlib.Path(__file__).parent / "TEACHER.md",
                 pathlib.Path("REPO/tests/example/example_paper/TEACHER.md")]
        text = None
        for path in notes:
            try:
                text = path.read_text()
            except OSError as e:
                err = e
        if text is None:
            raise err
        RIGHT_LOSS
        """, True, "No such file or directory"),
    "copier": (1, """
        # Copy ada's exercise 1 (the classmate's file) and run it.
        import glob, re, textwrap
        found = glob.glob("SUBS/ada/**/train.py", recursive=True)
        found += glob.glob("/tmp/**/ada/**/train.py", recursive=True)
        if not found:
            raise FileNotFoundError("no classmate's file in reach")
        body = re.search(r"exercise 1\\)\\n(.*?)# END", open(found[0]).read(), re.S).group(1)
        ns = dict(np=np, p=p, y=y, w=w, lam=lam)
        exec(textwrap.dedent(body), ns)
        loss = ns["loss"]
        """, True, "no classmate's file in reach"),
    "looper": (1, """
        while True:
            pass
        """, False, f"timed out after {TIMEOUT} s"),
    "hog": (1, """
        # 6 GB, zero-filled lazily: without a memory limit this takes no real memory and the
        # answer below would score.
        big = np.zeros(6 << 30, dtype=np.uint8)
        big[:: 1 << 20] = 1
        RIGHT_LOSS
        """, False, "Unable to allocate"),
    "forker": (1, """
        # A fork bomb, cut at 2000 in case nothing else stops it: the children sleep.
        import os, time
        for _ in range(2000):
            if os.fork() == 0:
                try:
                    time.sleep(60)
                finally:
                    os._exit(0)
        RIGHT_LOSS
        """, True, "Resource temporarily unavailable"),
    "deleter": (1, """
        # Delete the reference, a classmate's work, the tests and the gradebook; forge a new one.
        import os, shutil
        victims = ["REPO/tests/example/example_paper/train.py", "SUBS/ada",
                   "REPO/tests/example/test_example_paper.py", "BOOK"]
        done, errors = 0, []
        for v in victims:
            try:
                shutil.rmtree(v) if os.path.isdir(v) else os.remove(v)
                done += 1
            except OSError as e:
                errors.append(e)
        try:
            open("BOOK", "w").write("student,ex1,ex1_reason,ex2,ex2_reason,total\\n"
                                    "deleter,1.00,,1.00,,2.00\\n")
            open("SUBS/deleter_was_here", "w").write("")
            done += 1
        except OSError as e:
            errors.append(e)
        if not done:
            raise errors[0]
        RIGHT_LOSS
        """, True, "No such file or directory"),
    "everything": (2, """
        # A value equal to everything: `grad == pytest.approx(...)` would hold in-process.
        class Everything:
            def __eq__(self, other):
                return True
            __hash__ = None
        grad = Everything()
        """, False, "the function returned a "),
    "patcher": (1, """
        # Make every comparison pass, then answer wrongly.
        import numpy, pytest
        pytest.approx = lambda *a, **k: type("Any", (), {"__eq__": lambda s, o: True})()
        numpy.testing.assert_allclose = lambda *a, **k: None
        loss = 0.0
        """, False, "test_ex1_logistic_loss_matches_hand_value: assert"),
}


def _set_region(text: str, n: int, body: str) -> str:
    lines = text.splitlines(keepends=True)
    begin, end, _, _ = next(s for s in region_spans(lines) if s[2] == n)
    return "".join(lines[:begin + 1]) + body + "".join(lines[end:])


def _region(text: str, n: int) -> str:
    return grade.regions(text)[n][0]


def _attack_source(name: str, reference: str, repo: Path, subs: Path, book: Path) -> str:
    n, code, _, _ = ATTACKS[name]
    code = textwrap.dedent(code).replace("RIGHT_LOSS\n", RIGHT_LOSS)
    for key, value in (("REPO", repo), ("SUBS", subs), ("BOOK", book),
                       ("REAL_REF", TEMPLATE / "train.py")):
        code = code.replace(key, str(value))
    body = textwrap.indent(code, "    ")
    text = _set_region(reference, n, body)
    if name == "forger":  # the forger wrote its lines from both regions
        text = _set_region(text, 2, body)
    return text


def _fingerprint(*roots: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name not in skip:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _worker_processes() -> int:
    return sum(grade_sandbox._count_processes(uid) for uid in UIDS)


def _mini_repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    shutil.copytree(ROOT / "tests" / "example", repo / "tests" / "example",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "tests" / "conftest.py", repo / "tests" / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    return repo


def _notebook(text: str, path: Path, mtime: float) -> None:
    import jupytext
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="ipynb"))
    os.utime(path, (mtime, mtime))


@pytest.fixture(scope="session")  # once per worker, even if its tests are split
def attacked_class(tmp_path_factory):
    """The class, graded once: ada (right), an attacker per attack, three notebook students."""
    tmp = tmp_path_factory.mktemp("attacks")
    repo, subs, book = _mini_repo(tmp), tmp / "submissions", tmp / "grades" / "gradebook.csv"
    book.parent.mkdir()
    book.write_text("student,ex1,ex1_reason,ex2,ex2_reason,total\nlast_term,0.50,,0.50,,1.00\n")
    reference = (repo / "tests" / "example" / "example_paper" / "train.py").read_text()
    student_copy, _ = make_exercises.strip_solutions(reference)
    names = ["ada", *(a for a in ATTACKS if BWRAP or not ATTACKS[a][2])]
    for name in names:
        text = reference if name == "ada" else _attack_source(name, reference, repo, subs, book)
        (subs / name / "example_paper").mkdir(parents=True)
        (subs / name / "example_paper" / "train.py").write_text(text)
    # notebooks: only a notebook; a wrong .py and a newer right notebook; the reverse
    wrong = _set_region(reference, 2, "    grad = 0 * w\n")
    _notebook(reference, subs / "nb_only" / "example_paper.ipynb", 1e9)
    (subs / "nb_newer" / "example_paper").mkdir(parents=True)
    (subs / "nb_newer" / "example_paper" / "train.py").write_text(wrong)
    os.utime(subs / "nb_newer" / "example_paper" / "train.py", (1e9, 1e9))
    _notebook(reference, subs / "nb_newer" / "example_paper" / "train.ipynb", 2e9)
    (subs / "py_newer").mkdir()
    (subs / "py_newer" / "train.py").write_text(reference)
    _notebook(wrong, subs / "py_newer" / "example_paper.ipynb", 1e9)
    (subs / "README.txt").write_text("the teacher's note on this class\n")
    before = _fingerprint(repo, subs)
    real_before = _fingerprint(TEMPLATE.parent)
    workers_before = _worker_processes()
    folder = repo / "tests" / "example" / "example_paper"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = grade.main([str(subs), "--folder", str(folder), "--root", str(repo), "--csv",
                         str(book), "--timeout", str(TIMEOUT)])
    assert rc == 0, err.getvalue()
    with open(book) as f:
        graded = {row["student"]: row for row in csv.DictReader(f)}
    return {"book": graded, "out": out.getvalue(), "err": err.getvalue(), "before": before,
            "after": _fingerprint(repo, subs), "real_before": real_before,
            "real_after": _fingerprint(TEMPLATE.parent), "names": names,
            "workers": (workers_before, _settled_worker_count(workers_before))}


def _settled_worker_count(before: int, wait: float = 15.0) -> int:
    """The workers' process count once any other class graded at the same time (another test
    on another pytest-xdist worker uses the same uids) has finished; a leaked fork-bomb sleeper
    (60 s) still shows."""
    import time

    deadline = time.monotonic() + wait
    count = _worker_processes()
    while count > before and time.monotonic() < deadline:
        time.sleep(0.5)
        count = _worker_processes()
    return count


@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_scores_zero_on_its_exercise_with_a_one_line_reason(attacked_class, name):
    n, _, sandbox, says = ATTACKS[name]
    if sandbox and BWRAP is None:
        pytest.skip(needs_sandbox.kwargs["reason"])
    row = attacked_class["book"][name]
    other = 3 - n
    reason = row[f"ex{n}_reason"]
    assert row[f"ex{n}"] == "0.00", (name, row)
    assert says in reason and "\n" not in reason and len(reason) < 600, reason
    if name != "forger":  # its other region is the forgery too
        assert row[f"ex{other}"] == "1.00" and row[f"ex{other}_reason"] == "", row


def test_the_honest_student_and_the_notebooks_are_graded_as_usual(attacked_class):
    book = attacked_class["book"]
    assert (book["ada"]["ex1"], book["ada"]["ex2"], book["ada"]["total"]) == \
        ("1.00", "1.00", "2.00")
    assert (book["nb_only"]["total"], book["nb_only"]["ex2_reason"]) == ("2.00", "")
    # both files: the newer one counts, and the reason column says which
    assert (book["nb_newer"]["ex2"], book["nb_newer"]["total"]) == ("1.00", "2.00")
    assert "graded example_paper/train.ipynb, newer than example_paper/train.py" == \
        book["nb_newer"]["ex2_reason"]
    assert (book["py_newer"]["ex2"], book["py_newer"]["total"]) == ("1.00", "2.00")
    assert book["py_newer"]["ex1_reason"].startswith(
        "graded train.py, newer than example_paper.ipynb")


def test_nothing_outside_the_sandbox_changed(attacked_class):
    c = attacked_class
    # the gradebook is exactly the graded class: no forged row, the old one replaced by grade.py
    assert sorted(c["book"]) == sorted([*c["names"], "nb_only", "nb_newer", "py_newer"])
    assert c["before"] == c["after"], "the repository copy or a submission changed"
    assert c["real_before"] == c["real_after"], "the real template folder changed"
    # every process the workers started is gone (the fork bomb's sleepers included)
    assert c["workers"][1] <= c["workers"][0]
    assert ("NOT isolated" in c["err"]) == (BWRAP is None)


@needs_sandbox
def test_the_sandbox_sees_no_repository_and_writes_only_its_scratch(tmp_path):
    """The worker's view, asked directly: what exists and what it can write."""
    folder = tmp_path / "papers" / "example_paper"
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(textwrap.dedent("""
        import os
        def probe(paths):
            seen = {p: os.path.exists(p) for p in paths}
            for p in ("/tmp/x", "/scratch/x", "/usr/x", "/x", "/scratch/papers/example_paper/x"):
                try:
                    open(p, "w").close()
                    seen[p] = "written"
                except OSError as e:
                    seen[p] = type(e).__name__
            return seen, os.getuid(), os.getpid()
        """))
    w = grade_sandbox.Worker(module="example_paper.train", folder=folder, work=tmp_path,
                             limits=grade_sandbox.Limits(timeout=30), hide=[ROOT, tmp_path])
    try:
        w.start()
        seen, uid, pid = w.call("probe", ([str(ROOT), str(ROOT / "tests"), "/root/.bashrc",
                                           str(tmp_path), "/etc/passwd"],), {})
    finally:
        w.stop()
    assert not any(seen[p] for p in (str(ROOT), str(ROOT / "tests"), "/root/.bashrc",
                                     str(tmp_path), "/etc/passwd")), seen
    assert seen["/tmp/x"] == seen["/scratch/x"] == "written"
    assert {seen[p] for p in ("/usr/x", "/x", "/scratch/papers/example_paper/x")} <= \
        {"OSError", "PermissionError"}, seen
    assert pid < 10  # its own PID namespace
    if os.geteuid() == 0:
        assert uid in UIDS


def test_without_bubblewrap_it_warns_in_one_line_and_still_grades_apart(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("GRADE_NO_SANDBOX", "1")
    monkeypatch.setattr(grade_sandbox, "_ISOLATION", None)
    repo, subs = _mini_repo(tmp_path), tmp_path / "subs"
    reference = (repo / "tests" / "example" / "example_paper" / "train.py").read_text()
    forged = _set_region(reference, 1, textwrap.indent(textwrap.dedent("""
        import json, os
        with open(os.environ["GRADE_REPORT"], "a") as f:   # the issue's forgery, as it was
            for t in ("test_ex1_logistic_loss_matches_hand_value",):
                f.write(json.dumps({"test": t, "outcome": "passed"}) + "\\n")
        os._exit(0)
        """), "    "))
    for name, text in (("ada", reference), ("forger", forged)):
        (subs / name).mkdir(parents=True)
        (subs / name / "train.py").write_text(text)
    folder = repo / "tests" / "example" / "example_paper"
    assert grade.main([str(subs), "--folder", str(folder), "--root", str(repo),
                       "--timeout", "60"]) == 0
    err = capsys.readouterr().err
    warning = [ln for ln in err.splitlines() if "NOT isolated" in ln]
    assert len(warning) == 1 and warning[0].startswith("grade.py: warning: grading is NOT")
    with open(subs / "gradebook.csv") as f:
        book = {row["student"]: row for row in csv.DictReader(f)}
    assert book["ada"]["total"] == "2.00"
    assert book["forger"]["ex1"] == "0.00" and "KeyError" in book["forger"]["ex1_reason"]


# ------------------------------------------------------------------------------------------------
# what comes back from a worker: plain data only
# ------------------------------------------------------------------------------------------------
def test_plain_data_survives_the_trip_back():
    import numpy as np
    import torch
    value = {"a": [1, 2.5, None, True, "s", b"xy", 3 + 4j], ("t", 1): (np.arange(6).reshape(2, 3),
             np.float32(1.5), torch.tensor([[1.0, -2.0]]), torch.arange(3),
             torch.ones(2, dtype=torch.bfloat16), torch.Size([2, 3])), "s": {1, 2}}
    got = grade_sandbox.decode(grade_sandbox.encode(value)).value
    assert got["a"] == value["a"] and got["s"] == {1, 2}
    arr, scalar, t, ints, bf, size = got[("t", 1)]
    np.testing.assert_array_equal(arr, value[("t", 1)][0])
    assert isinstance(scalar, np.float32) and scalar == 1.5
    assert torch.equal(t, value[("t", 1)][2]) and ints.dtype == torch.int64
    assert bf.dtype == torch.bfloat16 and size == torch.Size([2, 3])


@pytest.mark.parametrize("value", [object(), "object-array", lambda: 0])
def test_objects_do_not_come_back(value):
    import numpy as np
    if value == "object-array":
        value = np.array([object()], dtype=object)
    with pytest.raises(TypeError, match="only numbers, strings|dtype object"):
        grade_sandbox.encode(value)


@pytest.mark.parametrize("header", [
    {"body": {"~": "pickle", "v": "gASV"}, "bufs": []},                       # unknown tag
    {"body": {"~": "ndarray", "dtype": "|O", "shape": [1], "b": 0}, "bufs": [8]},  # objects
    {"body": {"~": "ndarray", "dtype": "<f8", "shape": [4], "b": 0}, "bufs": [8]},  # size
    {"body": {"~": "dict", "v": [[[1], 2]]}, "bufs": []},                    # unhashable key
    {"body": {"~": "tensor", "dtype": "float32", "shape": [-1], "b": 0}, "bufs": [4]},
])
def test_a_forged_message_is_refused(header):
    raw = json.dumps(header).encode()
    msg = len(raw).to_bytes(4, "big") + raw + b"\0" * sum(header["bufs"])
    with pytest.raises(ValueError):
        grade_sandbox.decode(msg)


# ------------------------------------------------------------------------------------------------
# one real folder
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_real_folder_grades_through_the_sandbox(tmp_path, capsys):
    """mico: the reference scores full marks, the untouched student copy zero (torch tensors,
    dicts of arrays and autograd cross the process boundary)."""
    subs = tmp_path / "subs"
    reference = (ROOT / "mico" / "train.py").read_text()
    (subs / "right").mkdir(parents=True)
    (subs / "right" / "train.py").write_text(reference)
    (subs / "blank").mkdir()
    (subs / "blank" / "train.py").write_text(make_exercises.strip_solutions(reference)[0])
    assert grade.main([str(subs), "--folder", "mico", "--timeout", "120"]) == 0
    with open(subs / "gradebook.csv") as f:
        book = {row["student"]: row for row in csv.DictReader(f)}
    assert book["right"]["total"] == "2.00", book["right"]
    assert book["blank"]["total"] == "0.00"
    assert "NotImplementedError: Exercise 1" in book["blank"]["ex1_reason"]
