"""The course kit a student receives: a bundle that stands alone, and notebooks that teach.

(The grader's own tests are in test_tools.py and test_grade_security.py.)
"""

import os
import subprocess
import sys

import nbformat
import pytest

import repo_checks as rc

sys.path.insert(0, str(rc.ROOT / "tools"))
import make_notebooks  # noqa: E402

pytestmark = pytest.mark.repo
TEMPLATE = rc.ROOT / "tests" / "example" / "example_paper"


@pytest.fixture
def bundle(tmp_path):
    assert make_notebooks.main([str(TEMPLATE), "--student", "--student-out", str(tmp_path)]) == 0
    return tmp_path / "example_paper"


def test_bundle_has_its_own_requirements_and_setup_and_no_dev_tools(bundle):
    req = (bundle / "requirements.txt").read_text()
    assert "torch==2.13.0" in req and "pytest==" in req and "jupytext==" in req
    assert "ruff" not in req and "pytest-xdist" not in req
    readme = (bundle / "README.md").read_text()
    assert "## Set-up" in readme and "pip install -r requirements.txt" in readme
    assert "example_paper/train.ipynb" in readme


def test_bundle_points_to_no_file_it_lacks(bundle):
    for md in bundle.rglob("*.md"):
        text = md.read_text()
        for absent in ("TEACHER.md", "tools/", "RESULTS.md"):
            assert absent not in text, f"{md.relative_to(bundle)} mentions {absent}"
    # what the student README drops is only what points elsewhere: the exercises remain
    text = (bundle / "example_paper" / "README.md").read_text()
    assert "## Exercises" in text and "(coding) Fill in the loss of Eq. (2)" in text


def test_unsolved_quick_run_names_the_exercises_in_one_line(bundle):
    env = dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "example_paper/train.py", "--quick"], cwd=bundle,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "exercise(s) 1, 2 not solved yet" in err[0]


def test_solved_quick_run_reads_without_the_repo(bundle):
    (bundle / "example_paper" / "train.py").write_text((TEMPLATE / "train.py").read_text())
    env = dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "example_paper/train.py", "--quick"], cwd=bundle,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no RESULTS.md here (the record over seeds 0-4 is in the course repository)" in (
        proc.stdout)


def test_remaking_a_bundle_keeps_the_students_runs(bundle, tmp_path):
    keep = bundle / "runs" / "example_paper" / "summary.json"
    keep.parent.mkdir(parents=True)
    keep.write_text("{}")
    assert make_notebooks.main([str(TEMPLATE), "--student", "--student-out", str(tmp_path)]) == 0
    assert keep.read_text() == "{}"


def test_student_notebook_is_paired_with_train_py_and_keeps_the_fences(bundle):
    import jupytext

    nb = nbformat.read(bundle / "example_paper" / "train.ipynb", as_version=4)
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    as_py = jupytext.writes(nb, fmt="py:percent")
    for n in (1, 2):
        assert f"# BEGIN SOLUTION (exercise {n})" in as_py
    assert 'raise NotImplementedError("Exercise 1' in as_py


def test_docstring_renders_as_markdown_with_its_reading_map():
    nb = make_notebooks.to_notebook(TEMPLATE / "train.py", "example_paper")
    first, doc = nb.cells[0], nb.cells[1]
    assert first.cell_type == "markdown" and doc.cell_type == "markdown"
    assert doc.source.startswith("# Example paper: L2-regularised logistic regression")
    assert "Reading map" in doc.source and '"""' not in doc.source
    # an indented block keeps a blank line above it, so it renders as a code block
    at = doc.source.index("    sigmoid -> logistic_loss")
    assert doc.source[:at].endswith("\n\n")
    assert make_notebooks.docstring_markdown("x = 1") is None


@pytest.mark.slow
def test_executed_notebook_teaches_in_order_without_progress_bar_noise(tmp_path):
    out = tmp_path / "nb"
    assert make_notebooks.main([str(TEMPLATE), "--out", str(out), "--execute"]) == 0
    nb = nbformat.read(out / "example_paper.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    try_it = next(c for c in code if c.source.startswith("if IN_NOTEBOOK:"))
    assert "step 0: loss 0.6931" in "".join(o.get("text", "") for o in try_it.outputs)
    # the Try it cell prints before main() runs: cells teach in order
    assert code.index(try_it) < len(code) - 1
    streams = [o for c in code for o in c.outputs if o.get("output_type") == "stream"]
    assert not [o for o in streams if o.get("name") == "stderr" and "it/s" in o.get("text", "")]
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "execute_result"
                and "Reading map" in str(o.get("data", {}))]
