"""Every common wrong answer listed in a TEACHER.md scores 0 on its exercise.

The answers are in `planted_answers.py`; `planted_plugin.py` grades them all in one pytest
process (see its docstring for how, and why it matches tools/grade.py's per-exercise score).
"""

import json
import os
import subprocess
import sys

import planted_answers
import pytest

import repo_checks as rc

pytestmark = pytest.mark.repo
ROOT = rc.ROOT


def test_as_student_file_replaces_only_the_named_exercise():
    text = (ROOT / "tests" / "example" / "example_paper" / "train.py").read_text()
    student = planted_answers.as_student_file(text, 2, "grad = 0 * w\n")
    assert "    grad = 0 * w\n    # END SOLUTION" in student
    assert "0.5 * lam * w @ w" in student  # exercise 1 untouched
    with pytest.raises(ValueError, match="has 1 region"):
        planted_answers.as_student_file(text, 2, ["a = 1\n", "b = 2\n"])


def test_every_planted_edit_still_applies_to_the_reference():
    assert not planted_answers.STALE, "\n".join(planted_answers.STALE)


def _test_file(folder):
    if folder == "example_paper":
        return ROOT / "tests" / "example" / "test_example_paper.py"
    return ROOT / "tests" / f"test_{folder}.py"


@pytest.fixture(scope="session")  # once per worker, even if its tests are split
def graded(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "report.json"
    files = [str(_test_file(f)) for f in {**planted_answers.ANSWERS, **planted_answers.PENDING}]
    env = dict(os.environ, PLANTED_REPORT=str(out), MPLBACKEND="Agg", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT / "tests" / "example"),
                                           str(ROOT)]))
    env.pop("PAPERS_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", *files, "-m", "exercise", "-q",
                           "-p", "planted_plugin", "-p", "no:cacheprovider", "-p", "no:xdist"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


CASES = [(f, n, name) for f, ex in planted_answers.ANSWERS.items() for n, answers in ex.items()
         for name in answers]


@pytest.mark.slow
@pytest.mark.parametrize("folder, n, name", CASES, ids=[f"{f}-ex{n}-{a}" for f, n, a in CASES])
def test_a_common_wrong_answer_scores_zero(graded, folder, n, name):
    passed, total, first, *_ = graded[folder][str(n)][name]
    assert total > 0, f"no test is marked exercise({n}) in {folder}"
    assert passed == 0, f"'{name}' passes {passed}/{total} tests of exercise {n}"


PENDING = sorted((f, n, name) for f, ex in planted_answers.PENDING.items()
                 for n, answers in ex.items() for name in answers)


@pytest.mark.slow
@pytest.mark.parametrize("folder, n, name", PENDING, ids=[f"{f}-ex{n}-{a}" for f, n, a in PENDING])
def test_a_pending_wrong_answer_still_passes_the_tests_it_is_pending_on(graded, folder, n, name):
    """PENDING holds the wrong answers that some test passes until stronger tests replace them.
    Once they do (the answer scores 0), its line in PENDING_BECAUSE goes: it is then in ANSWERS,
    and stays at 0. Also catches a PENDING_BECAUSE that names tests the answer no longer passes."""
    passed, total, first, _, names = graded[folder][str(n)][name]
    assert passed > 0, (f"'{name}' now scores 0 on exercise {n}: delete its line in "
                        "planted_answers.PENDING_BECAUSE (it then moves to ANSWERS)")
    assert set(names) == set(planted_answers.PENDING_BECAUSE[folder, n, name]), names


@pytest.mark.slow
@pytest.mark.parametrize("folder, n", sorted({(f, n) for f, n, _ in CASES}))
def test_the_reference_answer_passes_everything_through_the_same_harness(graded, folder, n):
    passed, total, first, *_ = graded[folder][str(n)]["<reference>"]
    assert passed == total > 0, first
