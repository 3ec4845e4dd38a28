"""Tests of tools/make_exercises.py and tools/run_all.py, on the template folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "tests" / "example" / "example_paper"
sys.path.insert(0, str(ROOT / "tools"))
import make_exercises  # noqa: E402
import run_all  # noqa: E402

pytestmark = pytest.mark.repo

SOURCE = '''def f(x):
    """doc"""
    y = 1
    # BEGIN SOLUTION (exercise 3)
    # Exercise 3: return x squared plus y.
    # Hint: ** is the power operator.
    z = x ** 2
    return z + y
    # END SOLUTION


def g(x):
    # BEGIN SOLUTION (exercise 4)
    # Return twice x.
    return 2 * x
    # END SOLUTION
'''


# --------------------------------------------------------------------------------------------
# make_exercises
# --------------------------------------------------------------------------------------------
def test_regions_become_not_implemented_with_the_prompt_and_indentation():
    text, numbers = make_exercises.strip_solutions(SOURCE)
    assert numbers == [3, 4]
    assert '    raise NotImplementedError("Exercise 3: return x squared plus y.")\n' in text
    # a prompt without the "Exercise N:" prefix gets it
    assert '    raise NotImplementedError("Exercise 4: Return twice x.")\n' in text
    assert "z = x ** 2" not in text and "return 2 * x" not in text
    # the fences and the prompt comments stay for the student
    assert text.count("# BEGIN SOLUTION") == 2 and text.count("# END SOLUTION") == 2
    assert "# Hint: ** is the power operator." in text
    namespace = {}
    exec(compile(text, "student", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="Exercise 3"):
        namespace["f"](2)


def test_everything_outside_the_regions_is_byte_identical():
    src = SOURCE.replace("\n", "\r\n") + "# trailing comment without newline"
    text, _ = make_exercises.strip_solutions(src)

    def outside(t):
        return re.sub(r"# BEGIN SOLUTION.*?# END SOLUTION", "<region>", t, flags=re.S)

    assert outside(text) == outside(src)
    assert text.endswith("# trailing comment without newline")
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")


def test_a_file_without_regions_is_copied_unchanged():
    body = "x = 1\n# a comment mentioning END of story\n"
    assert make_exercises.strip_solutions(body) == (body, [])


@pytest.mark.parametrize("text, complaint", [
    ("# BEGIN SOLUTION (exercise 1)\nx = 1\n", "has no '# END SOLUTION'"),
    ("x = 1\n# END SOLUTION\n", "without a BEGIN"),
    ("# BEGIN SOLUTION (exercise 1)\nx = 1\n# BEGIN SOLUTION (exercise 2)\ny = 2\n"
     "# END SOLUTION\n# END SOLUTION\n", "inside the region"),
    ("# BEGIN SOLUTION (exercise 1)\n# Exercise 1: nothing here\n# END SOLUTION\n", "no code"),
    ("# BEGIN SOLUTION exercise 1\nx = 1\n# END SOLUTION\n", "malformed fence"),
])
def test_unbalanced_or_malformed_fences_are_refused(tmp_path, capsys, text, complaint):
    folder = tmp_path / "src" / "bad_paper"
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(text)
    with pytest.raises(make_exercises.FenceError, match=complaint):
        make_exercises.strip_solutions(text)
    # the command line says it in one line, exits 2 and writes nothing
    assert make_exercises.main([str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and complaint in err
    assert not (tmp_path / "out").exists()


def _pytest(args, papers_dir=None):
    env = dict(os.environ)
    env.pop("PAPERS_DIR", None)
    if papers_dir:
        env["PAPERS_DIR"] = str(papers_dir)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_student_copy_fails_the_exercise_tests_and_the_reference_passes(tmp_path):
    assert make_exercises.main(["tests/example/example_paper", "--out", str(tmp_path)]) == 0
    student = tmp_path / "example_paper" / "train.py"
    assert "NotImplementedError" in student.read_text()
    # the other files of the folder are copied as they are
    assert (tmp_path / "example_paper" / "README.md").read_bytes() == \
        (TEMPLATE / "README.md").read_bytes()
    test_file = "tests/example/test_example_paper.py"
    ref = _pytest([test_file, "-m", "exercise"])
    assert ref.returncode == 0, ref.stdout[-2000:]
    stu = _pytest([test_file, "-m", "exercise"], papers_dir=tmp_path)
    assert stu.returncode == 1, stu.stdout[-2000:]
    assert "NotImplementedError: Exercise 1" in stu.stdout
    # the report header names where the folders came from
    assert f"paper folders imported from: {tmp_path.resolve()}" in stu.stdout


# --------------------------------------------------------------------------------------------
# run_all
# --------------------------------------------------------------------------------------------
@pytest.fixture
def mini_repo(tmp_path):
    """A repo root with the template folder, a root README with the index markers."""
    shutil.copytree(TEMPLATE, tmp_path / "example_paper",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "README.md").write_text("# Repo\n\n<!-- index:start -->\n<!-- index:end -->\n")
    return tmp_path


@pytest.mark.slow
def test_run_all_writes_mean_and_std_into_results_and_readmes(mini_repo, capsys):
    rc = run_all.main(["--root", str(mini_repo), "--folders", "example_paper",
                       "--seeds", "0", "1", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert re.search(r"\[1/3\] example_paper seed 0 \.\.\. ok", out)
    assert "[3/3] example_paper seed 2" in out
    runs = mini_repo / "runs" / "run_all" / "example_paper"
    acc = [json.loads((runs / f"seed{s}" / "summary.json").read_text())["metrics"]["accuracy"]
           for s in (0, 1, 2)]
    expected = f"{statistics.fmean(acc):.4g} ± {statistics.stdev(acc):.2g}"
    results = (mini_repo / "RESULTS.md").read_text()
    assert f"| accuracy ↑ | logistic | {expected} | majority |" in results
    assert "| 3/3 seeds |" in results
    assert "CPU time per run" in results and "wall time per run" in results
    readme = (mini_repo / "example_paper" / "README.md").read_text()
    block = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert expected in block and "3/3 seeds" in block
    index = (mini_repo / "README.md").read_text()
    assert "[`example_paper/`](example_paper/README.md)" in index and expected in index
    assert "| `smile/` | - | not implemented yet |" in index


@pytest.mark.slow
def test_run_all_exits_nonzero_naming_the_failed_run(mini_repo, capsys):
    broken = mini_repo / "broken_paper"
    shutil.copytree(mini_repo / "example_paper", broken)
    train = broken / "train.py"
    train.write_text(train.read_text().replace("    t0 = time.time()\n",
                                               "    t0 = time.time()\n    1 / 0\n"))
    rc = run_all.main(["--root", str(mini_repo), "--folders", "example_paper", "broken_paper",
                       "--seeds", "0"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken_paper seed 0 ... FAILED" in captured.out
    assert "1 run(s) failed: broken_paper seed 0" in captured.err
    # the runs that worked are still reported, the failed one is not
    results = (mini_repo / "RESULTS.md").read_text()
    assert "example_paper" in results and "broken_paper" not in results


def test_run_all_refuses_a_folder_without_train_py(mini_repo, capsys):
    assert run_all.main(["--root", str(mini_repo), "--folders", "nope"]) == 2
    assert "no train.py in nope" in capsys.readouterr().err


def test_index_shows_the_first_sentence_of_the_claim_cut_to_length():
    assert run_all.first_sentence("Short claim. More detail here.") == "Short claim."
    assert run_all.first_sentence("No full stop at all") == "No full stop at all"
    assert run_all.first_sentence("Ratio 0.5 wins. Next.") == "Ratio 0.5 wins."
    long = run_all.first_sentence("x" * 300 + ".", limit=50)
    assert len(long) == 50 and long.endswith("…")


def test_rows_are_matched_across_seeds_by_name_not_position():
    def summary(seed, rows):
        return {"seed": seed, "folder": "f", "wall_seconds": 1.0, "_run": {},
                "headline": [{"metric": m, "higher_is_better": True,
                              "method": {"name": "A", "value": a},
                              "baseline": {"name": "B", "value": b}} for m, a, b in rows]}

    table = "\n".join(run_all.folder_table([
        summary(0, [("acc", 0.9, 0.5), ("f1", 0.8, 0.7)]),
        summary(1, [("f1", 0.6, 0.7)]),  # an older run: one row fewer, in another position
    ]))
    assert "| acc ↑ | A | 0.9 ± 0 | B | 0.5 ± 0 | 1/1 seeds |" in table
    assert "| f1 ↑ | A | 0.7 ± 0.14 | B | 0.7 ± 0 | 1/2 seeds |" in table


@pytest.mark.slow
def test_report_only_rebuilds_the_tables_without_running(mini_repo, capsys):
    assert run_all.main(["--root", str(mini_repo), "--folders", "example_paper",
                         "--seeds", "0"]) == 0
    (mini_repo / "RESULTS.md").unlink()
    log = mini_repo / "runs" / "run_all" / "example_paper" / "seed0" / "log.txt"
    before = log.stat().st_mtime_ns
    assert run_all.main(["--root", str(mini_repo), "--report-only"]) == 0
    assert "| accuracy ↑ | logistic |" in (mini_repo / "RESULTS.md").read_text()
    assert log.stat().st_mtime_ns == before  # nothing was run again
    assert "[1/" not in capsys.readouterr().out.split("wrote")[-1]
