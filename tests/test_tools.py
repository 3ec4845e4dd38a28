"""Tests of tools/make_exercises.py and tools/run_all.py, on the template folder."""

from __future__ import annotations

import csv
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
import grade  # noqa: E402
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
def test_student_bundle_stands_alone_fails_unsolved_and_leaves_the_answers_out(tmp_path):
    assert make_exercises.main(["tests/example/example_paper", "--out", str(tmp_path)]) == 0
    bundle = tmp_path / "example_paper"
    student = bundle / "example_paper" / "train.py"
    assert "NotImplementedError" in student.read_text()
    # the README is copied without what points to the teacher's files; the notes are not copied
    assert (bundle / "example_paper" / "README.md").read_text() == \
        make_exercises.student_readme((TEMPLATE / "README.md").read_text())
    assert (TEMPLATE / "TEACHER.md").is_file()
    assert not (bundle / "example_paper" / "TEACHER.md").exists()
    assert (bundle / "tests" / "test_example_paper.py").is_file()
    test_file = "tests/example/test_example_paper.py"
    ref = _pytest([test_file, "-m", "exercise"])
    assert ref.returncode == 0, ref.stdout[-2000:]
    stu = _pytest([test_file, "-m", "exercise"], papers_dir=bundle)
    assert stu.returncode == 1, stu.stdout[-2000:]
    assert "NotImplementedError: Exercise 1" in stu.stdout
    # the report header names where the folders came from
    assert f"paper folders imported from: {bundle.resolve()}" in stu.stdout
    # the bundle runs on its own, from its own folder, as a student runs it
    env = {k: v for k, v in os.environ.items() if k != "PAPERS_DIR"}
    alone = subprocess.run([sys.executable, "-m", "pytest", "-m", "exercise"], cwd=bundle,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 1 and "3 failed" in alone.stdout, alone.stdout[-2000:]
    student.write_text((TEMPLATE / "train.py").read_text())  # "solved"
    alone = subprocess.run([sys.executable, "-m", "pytest", "-m", "exercise"], cwd=bundle,
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0 and "3 passed" in alone.stdout, alone.stdout[-2000:]


# --------------------------------------------------------------------------------------------
# grade
# --------------------------------------------------------------------------------------------
def test_splice_takes_only_the_named_exercise_from_the_student():
    student = SOURCE.replace("z = x ** 2", "z = x ** 3").replace("return 2 * x", "return 0")
    spliced = grade.splice(SOURCE, student, 3)
    assert "z = x ** 3" in spliced and "return 2 * x" in spliced  # ex 4 stays the reference
    assert grade.splice(SOURCE, student, 4).count("return 0") == 1
    with pytest.raises(ValueError, match="fences"):
        grade.splice(SOURCE, SOURCE.replace("# BEGIN SOLUTION (exercise 4)", ""), 4)


@pytest.mark.slow
def test_teacher_flow_copies_planted_students_and_a_gradebook(tmp_path, capsys):
    """Make copies, plant a wrong and a broken solution, grade the class, read the gradebook."""
    subs = tmp_path / "submissions"
    for name in ("ada", "bo", "cy", "di"):
        assert make_exercises.main(["tests/example/example_paper", "--out",
                                    str(subs / name)]) == 0
    reference = (TEMPLATE / "train.py").read_text()
    files = {name: subs / name / "example_paper" / "example_paper" / "train.py"
             for name in ("ada", "bo", "cy", "di")}
    files["ada"].write_text(reference)                                    # all correct
    files["bo"].write_text(reference.replace("X.T @ (p - y)", "X.T @ (y - p)"))  # sign error
    files["cy"].write_text(reference.replace("    eps = 1e-12\n", "    eps = = 1e-12\n"))
    # di hands in the untouched copy
    assert grade.main([str(subs), "--folder", "tests/example/example_paper"]) == 0
    out = capsys.readouterr().out
    with open(subs / "gradebook.csv") as f:
        book = {row["student"]: row for row in csv.DictReader(f)}
    assert {k: (book[k]["ex1"], book[k]["ex2"], book[k]["total"]) for k in book} == {
        "ada": ("1.00", "1.00", "2.00"),
        "bo": ("1.00", "0.00", "1.00"),    # partial credit: the sign error costs ex2 only
        "cy": ("0.00", "1.00", "1.00"),    # a syntax error in ex1 does not cost ex2
        "di": ("0.00", "0.00", "0.00")}
    assert book["ada"]["ex1_reason"] == book["ada"]["ex2_reason"] == ""
    assert "test_ex2_logistic_gradient" in book["bo"]["ex2_reason"]
    assert "does not import: SyntaxError" in book["cy"]["ex1_reason"]
    assert "NotImplementedError: Exercise 1" in book["di"]["ex1_reason"]
    assert "Traceback" not in out and "cy       0.00    1.00    1.00/2" in out


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
    assert f"| test accuracy ↑ | logistic | {expected} | majority |" in results
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
    train.write_text(train.read_text().replace("    t_start = time.time()\n",
                                               "    t_start = time.time()\n    1 / 0\n"))
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


def _summary(seed, rows, folder="f"):
    """A summary.json as a folder writes it; rows are (metric, method, baseline[, expect])."""
    return {"seed": seed, "folder": folder, "wall_seconds": 1.0, "_run": {},
            "headline": [{"metric": r[0], "higher_is_better": True,
                          "expect": r[3] if len(r) > 3 else "better",
                          "method": {"name": "A", "value": r[1]},
                          "baseline": {"name": "B", "value": r[2]}} for r in rows]}


def test_rows_are_matched_across_seeds_by_name_not_position():
    table = "\n".join(run_all.folder_table([
        _summary(0, [("acc", 0.9, 0.5), ("f1", 0.8, 0.7)]),
        _summary(1, [("f1", 0.6, 0.7)]),  # an older run: one row fewer, in another position
    ]))
    assert "| acc ↑ | A | 0.9 ± 0 | B | 0.5 ± 0 | better | 1/1 seeds |" in table
    assert "| f1 ↑ | A | 0.7 ± 0.14 | B | 0.7 ± 0 | better | 1/2 seeds |" in table


def test_a_row_is_counted_as_held_by_what_it_expects():
    table = "\n".join(run_all.folder_table([
        _summary(0, [("acc", 0.9, 0.5), ("ctl", 0.500, 0.505, "level"),
                     ("neg", 0.1, 0.9, "report")]),
        _summary(1, [("acc", 0.4, 0.5), ("ctl", 0.60, 0.50, "level"),
                     ("neg", 0.9, 0.1, "report")]),
    ]))
    assert "| acc ↑ | A | 0.65 ± 0.35 | B | 0.5 ± 0 | better | 1/2 seeds |" in table
    # within 2 % on seed 0 (0.5 vs 0.505), not on seed 1 (0.6 vs 0.5): one of two
    assert "| level | 1/2 seeds |" in table
    # a report row claims nothing, so it is never counted as held or failed
    assert "| report | - (not a claim) |" in table
    assert run_all.held(_summary(0, [("m", 1.0, 1.019, "level")])["headline"][0]) is True
    assert run_all.held(_summary(0, [("m", 1.0, 1.03, "level")])["headline"][0]) is False


def test_a_level_row_behind_on_every_seed_fails_and_a_margin_is_used():
    def level(seed, m, b, margin=None):
        s = _summary(seed, [("ctl", m, b, "level")])
        if margin is not None:
            s["headline"][0].update(margin=margin, margin_why="stated")
        return s

    # every seed within its margin, but the method behind on all of them: a deficit, not a tie
    table = "\n".join(run_all.folder_table([level(0, 0.50, 0.51, 0.05),
                                             level(1, 0.49, 0.52, 0.05)]))
    assert "| level | 0/2 (behind on every seed) seeds |" in table
    # one seed ahead: counted by the margin (0.03 <= 0.05 held; 0.08 not)
    table = "\n".join(run_all.folder_table([level(0, 0.53, 0.50, 0.05),
                                             level(1, 0.42, 0.50, 0.05)]))
    assert "| level | 1/2 seeds |" in table
    row = level(0, 0.5, 0.6, 0.2)["headline"][0]
    assert run_all.held(row) is True and run_all.held({**row, "margin": 0.05}) is False


def test_a_claim_that_is_the_same_on_every_seed_is_flagged_not_counted():
    table = "\n".join(run_all.folder_table([_summary(s, [("ms", 2.79, 1.77)]) for s in range(3)]))
    assert "3/3 (constant over seeds: a report, not evidence)" in table


def test_index_shows_the_first_better_row_not_a_control(tmp_path):
    root = tmp_path
    (root / "f").mkdir()
    (root / "f" / "README.md").write_text("# F: a claim\n\nThe claim.\n")
    for seed in (0, 1, 7):
        out = root / "runs" / "run_all" / "f" / f"seed{seed}"
        out.mkdir(parents=True)
        rows = [("ctl", 0.5, 0.5, "level"), ("main", 0.9, 0.2)] if seed != 7 else \
            [("ctl", 0.5, 0.5, "level"), ("main", 123.0, 0.2)]  # seed 7 is not reported
        (out / "summary.json").write_text(json.dumps(_summary(seed, rows)))
    (root / "README.md").write_text("<!-- index:start -->\n<!-- index:end -->\n")
    run_all.write_reports(root, root / "runs" / "run_all", ["f"], [0, 1])
    index = (root / "README.md").read_text()
    assert "main: A 0.9 ± 0 vs B 0.2 ± 0 | 2/2 |" in index
    assert "ctl:" not in index and "123" not in (root / "RESULTS.md").read_text()


@pytest.mark.slow
def test_report_only_rebuilds_the_tables_without_running(mini_repo, capsys):
    assert run_all.main(["--root", str(mini_repo), "--folders", "example_paper",
                         "--seeds", "0"]) == 0
    (mini_repo / "RESULTS.md").unlink()
    log = mini_repo / "runs" / "run_all" / "example_paper" / "seed0" / "log.txt"
    before = log.stat().st_mtime_ns
    assert run_all.main(["--root", str(mini_repo), "--report-only"]) == 0
    assert "| test accuracy ↑ | logistic |" in (mini_repo / "RESULTS.md").read_text()
    assert log.stat().st_mtime_ns == before  # nothing was run again
    assert "[1/" not in capsys.readouterr().out.split("wrote")[-1]


@pytest.mark.slow
def test_tune_runs_apart_and_rewrites_no_file(mini_repo, capsys):
    before = {p: p.read_text() for p in (mini_repo / "README.md",
                                         mini_repo / "example_paper" / "README.md")}
    assert run_all.main(["--root", str(mini_repo), "--folders", "example_paper", "--tune",
                         "--seeds", "100", "--extra", "--lam 0.1", "--tag", "lam0.1"]) == 0
    run = mini_repo / "runs" / "tune" / "lam0.1" / "example_paper" / "seed100"
    assert json.loads((run / "summary.json").read_text())["config"]["lam"] == 0.1
    assert not (mini_repo / "runs" / "run_all").exists()
    assert not (mini_repo / "RESULTS.md").exists()
    assert all(p.read_text() == text for p, text in before.items())
    assert "| test accuracy ↑ | logistic |" in capsys.readouterr().out


def test_extra_flags_are_refused_outside_tuning(mini_repo):
    with pytest.raises(SystemExit):
        run_all.main(["--root", str(mini_repo), "--folders", "example_paper",
                      "--extra", "--lam 0.1"])


# --------------------------------------------------------------------------------------------
# make_notebooks
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_generated_notebook_runs_end_to_end_in_a_kernel(tmp_path):
    """The file as a notebook: every cell runs, main() ignores the kernel's argv (--quick)."""
    import make_notebooks
    import nbformat

    out = tmp_path / "nb"
    assert make_notebooks.main(["tests/example/example_paper", "--out", str(out),
                                "--execute"]) == 0
    nb = nbformat.read(out / "example_paper.ipynb", as_version=4)
    assert nb.cells[0].cell_type == "markdown"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[-1].source.startswith('if __name__ == "__main__":') and "main()" in code[-1].source
    text = "".join(o.get("text", "") for o in code[-1].outputs)
    assert "Verdict (this seed):" in text and "--quick is a smoke run" in text
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert (out / "runs" / "example_paper" / "summary.json").is_file()  # cwd = notebook's dir


@pytest.mark.slow
def test_a_paper_notebook_runs_and_shows_its_figures_inline(tmp_path):
    """A real folder (mico, the fastest --quick) as a notebook: no error, plots inline."""
    import make_notebooks
    import nbformat

    assert make_notebooks.main(["mico", "--out", str(tmp_path), "--execute"]) == 0
    nb = nbformat.read(tmp_path / "mico.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1
    assert "Verdict (this seed):" in "".join(o.get("text", "") for o in outputs)


def test_running_some_folders_keeps_the_others_numbers(tmp_path):
    # RESULTS.md and the index keep a folder that has no runs here (an earlier run_all made them)
    root = tmp_path
    for name in ("f", "g"):
        (root / name).mkdir()
        (root / name / "README.md").write_text(f"# {name.upper()}: a claim\n\nThe claim.\n")
    (root / "RESULTS.md").write_text("# Results\n\n## g: G\n\n| old g table |\n\nSeeds 0-4.\n")
    (root / "README.md").write_text("<!-- index:start -->\n| [`g/`](g/README.md) | G | old row |"
                                    "\n<!-- index:end -->\n")
    out = root / "runs" / "run_all" / "f" / "seed0"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(_summary(0, [("main", 0.9, 0.2)], "f")))
    run_all.write_reports(root, root / "runs" / "run_all", ["f", "g"], [0])
    results = (root / "RESULTS.md").read_text()
    assert "## f: F" in results and "## g: G\n\n| old g table |" in results
    assert "| [`g/`](g/README.md) | G | old row |" in (root / "README.md").read_text()


def test_a_run_rewrites_only_the_folders_it_ran(tmp_path):
    root = tmp_path
    for name in ("f", "g"):
        (root / name).mkdir()
        (root / name / "README.md").write_text(
            f"# {name.upper()}: a claim\n\nThe claim.\n\n<!-- results:start -->\nold\n"
            "<!-- results:end -->\n")
        out = root / "runs" / "run_all" / name / "seed0"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(_summary(0, [("main", 0.9, 0.2)], name)))
    (root / "RESULTS.md").write_text("# Results\n\n## g: G\n\n| old g table |\n")
    run_all.write_reports(root, root / "runs" / "run_all", ["f", "g"], [0], rewrite={"f"})
    assert "\nold\n" not in (root / "f" / "README.md").read_text()
    assert "\nold\n" in (root / "g" / "README.md").read_text()
    assert "| old g table |" in (root / "RESULTS.md").read_text()


def test_a_named_condition_is_reported_beside_the_default_and_kept_when_not_rerun(
        tmp_path, monkeypatch):
    # dreamblend-style: the default world's table and a second world's table, each from its own
    # runs, each in its own README block; the index shows only the default
    monkeypatch.setattr(run_all, "CONDITIONS", {"f": {"alt": ["--world", "alt"]}})
    root = tmp_path
    (root / "f").mkdir()
    start, end = run_all.condition_markers("alt")
    (root / "f" / "README.md").write_text(
        "# F: a claim\n\nThe claim.\n\n<!-- results:start -->\nold\n<!-- results:end -->\n"
        f"{start}\nold alt\n{end}\n")
    (root / "README.md").write_text("<!-- index:start -->\n<!-- index:end -->\n")
    runs = root / "runs" / "run_all"
    for sub, value in ((["seed0"], 0.9), (["alt", "seed0"], 0.3)):
        out = runs.joinpath("f", *sub)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(_summary(0, [("main", value, 0.2)], "f")))
    run_all.write_reports(root, runs, ["f"], [0])
    readme = (root / "f" / "README.md").read_text()
    default_block = readme.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    alt_block = readme.split(start)[1].split(end)[0]
    assert "| 0.9 ± 0 |" in default_block and "0.3" not in default_block
    assert "| 0.3 ± 0 |" in alt_block and "0.9" not in alt_block
    assert "`python tools/run_all.py --folders f --condition alt`" in alt_block
    results = (root / "RESULTS.md").read_text()
    assert "### f, condition alt (`--world alt`)" in results
    assert results.index("| 0.9 ± 0 |") < results.index("### f, condition alt")
    assert "0.3" not in (root / "README.md").read_text()
    # a later rebuild without the condition's runs keeps what RESULTS.md said of it
    shutil.rmtree(runs / "f" / "alt")
    run_all.write_reports(root, runs, ["f"], [0])
    assert "### f, condition alt (`--world alt`)" in (root / "RESULTS.md").read_text()
    assert "| 0.3 ± 0 |" in (root / "RESULTS.md").read_text()


def test_run_all_refuses_a_condition_the_folder_does_not_declare(mini_repo, capsys):
    assert run_all.main(["--root", str(mini_repo), "--folders", "example_paper",
                         "--condition", "layout"]) == 2
    assert "no condition 'layout' in example_paper" in capsys.readouterr().err
