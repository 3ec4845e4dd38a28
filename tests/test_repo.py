"""Repository conventions (CONTRIBUTING.md), checked for every paper folder that exists.

The first half runs each check of `repo_checks.py` on the real folders (and on the template folder,
so the checks always run on something). The second half shows that every check can fail: it breaks
a temporary copy of the template in one specific way and asserts that exactly that check complains.
"""

from __future__ import annotations

import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

import repo_checks as rc

pytestmark = pytest.mark.repo

ROOT = rc.ROOT
TEMPLATE = ROOT / "tests" / "example" / "example_paper"
FOLDERS = [ROOT / f for f in rc.PAPER_FOLDERS if (ROOT / f).is_dir()] + [TEMPLATE]
IDS = [f.name for f in FOLDERS]

_probes: dict[Path, dict] = {}


def probe(folder: Path) -> dict:
    """One fresh interpreter per folder, shared by the three tests that read its report."""
    if folder not in _probes:
        _probes[folder] = rc.probe(folder)
    return _probes[folder]


# --------------------------------------------------------------------------------------------
# The checks on every folder
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_folder_has_train_and_readme(folder):
    assert rc.check_files(folder) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_readme_has_the_style_sections_in_order(folder):
    assert rc.check_readme(folder) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_train_imports_only_stdlib_and_pinned_packages(folder):
    assert rc.check_imports(folder) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_importing_train_creates_nothing_and_starts_nothing(folder):
    assert rc.check_import_is_inert(probe(folder)) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_help_exits_zero_and_lists_the_contract_options(folder):
    assert rc.check_help(probe(folder)) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_bad_arguments_exit_nonzero_with_one_line(folder):
    assert rc.check_bad_args(probe(folder)) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_readme_exercises_ask_and_teacher_notes_hold_the_answers(folder):
    assert rc.check_teacher_split(folder) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_solution_fences_are_well_formed_so_bundles_and_grading_work(folder):
    # make_exercises.py and grade.py refuse a file whose fences do not pair up (a region whose
    # END line was lost reads as a BEGIN inside the region).
    sys.path.insert(0, str(ROOT / "tools"))
    import make_exercises

    text = (folder / "train.py").read_text()
    make_exercises.strip_solutions(text, str(folder / "train.py"))  # raises FenceError if bad


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_readme_and_teacher_notes_name_no_tracker_issue(folder):
    assert rc.check_no_issue_refs(folder) == []


def test_issue_reference_check_catches_an_issue_number(broken):
    folder = broken(readme_edit=lambda t: t.replace("## Run\n", "## Run\n\nAs issue 17 asked.\n"))
    assert any("'issue 17'" in p for p in rc.check_no_issue_refs(folder))


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_every_coding_exercise_is_graded_by_tests_with_its_number(folder):
    tests = ROOT / "tests" / f"test_{folder.name}.py"
    if folder == TEMPLATE:
        tests = TEMPLATE.parent / "test_example_paper.py"
    assert rc.check_exercise_marks(folder, tests) == []


_quick_runs: dict[Path, dict] = {}


def quick(folder: Path) -> dict:
    """One `--quick` run per folder, shared by the tests that read it (one xdist group each)."""
    if folder not in _quick_runs:
        _quick_runs[folder] = rc.quick_run(folder)
    return _quick_runs[folder]


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_quick_run_ends_with_verdict_warning_and_files_and_rows_say_what_they_claim(folder):
    moved = folder.name not in rc.NOT_YET_MOVED
    assert rc.check_quick_run(quick(folder), moved=moved) == []


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_figures_read_at_their_saved_size_and_name_the_method(folder):
    if folder.name in rc.NOT_YET_MOVED:
        pytest.skip("listed in NOT_YET_MOVED: its paper issue moves it")
    assert rc.check_figures(quick(folder)) == []


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_quick_run_fits_its_cpu_budget(folder):
    if folder.name in rc.NOT_YET_MOVED:
        pytest.skip("listed in NOT_YET_MOVED: its paper issue moves it")
    assert rc.check_quick_budget(quick(folder)) == []


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_train_puts_the_paper_first_and_the_identical_appendix_last(folder):
    if folder.name in rc.NOT_YET_MOVED:
        pytest.skip("listed in NOT_YET_MOVED: its paper issue moves it")
    assert rc.check_layout(folder) == []


@pytest.mark.parametrize("name", sorted(rc.NOT_YET_MOVED))
def test_not_yet_moved_folders_really_lack_the_layout(name):
    # Once a folder passes the layout check, it must leave the list (and then keep passing).
    assert rc.check_layout(ROOT / name) != [], f"{name} has moved: remove it from NOT_YET_MOVED"


def test_every_appendix_held_agrees_with_the_one_run_all_counts():
    # The run's verdict line and run_all's k/5 must never disagree: compare the two rules.
    ns: dict = {"__name__": "appendix", "re": re, "Config": object, "Path": Path}
    code = rc.appendix(rc.TEMPLATE_TRAIN.read_text()).split("if __name__")[0]
    exec(compile(code.replace("(argparse.ArgumentParser)", ""), "appendix", "exec"), ns)
    grid = [(m, b, e, hib, margin) for m in (0.5, 1.0, 1.019, 1.03, 2.0) for b in (1.0, 1.02)
            for e in ("better", "level", "report") for hib in (True, False)
            for margin in (None, 0.01, 0.5)]
    for m, b, e, hib, margin in grid:
        row = {"metric": "x", "higher_is_better": hib, "expect": e,
               "method": {"name": "a", "value": m}, "baseline": {"name": "b", "value": b}}
        if margin is not None:
            row["margin"] = margin
        assert ns["held"](row) == rc.held(row), row


# --------------------------------------------------------------------------------------------
# Repo-level files
# --------------------------------------------------------------------------------------------
def test_requirements_are_pinned_exactly():
    text = (ROOT / "requirements.txt").read_text()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines()]
    pins = [ln for ln in lines if ln]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.+]*", p) for p in pins), pins
    assert "torch==2.13.0" in pins
    names = rc.requirement_names()
    needed = set(rc.ALLOWED_PACKAGES.values()) | {"pytest", "ruff"}
    assert needed <= names, needed - names


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    run_cmd = "pip install -r requirements.txt && python ecd/train.py"
    test_cmd = "pip install -r requirements.txt && pytest"
    assert run_cmd in readme and test_cmd in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, ".ci/run must run exactly the README's test command"
    assert ci.index("ruff check .") < ci.index(test_cmd)


def test_pyproject_declares_a_marker_per_folder_and_no_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "project" not in cfg and "build-system" not in cfg
    markers = {m.split(":")[0].split("(")[0]
               for m in cfg["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"slow", "exercise", *rc.PAPER_FOLDERS} <= markers
    assert cfg["tool"]["ruff"]["line-length"] == 100


def test_gitignore_covers_runs_caches_and_student_copies():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"runs/", "student/", "submissions/", "notebooks/", "__pycache__/"} <= set(ignored)


# --------------------------------------------------------------------------------------------
# Each check fails on a deliberately broken copy of the template
# --------------------------------------------------------------------------------------------
@pytest.fixture
def broken(tmp_path):
    """Copy the template to tmp_path/<name>; return an editor: broken(edit_fn) -> folder."""

    def make(train_edit=None, readme_edit=None, name="example_paper"):
        folder = tmp_path / name
        shutil.copytree(TEMPLATE, folder, ignore=shutil.ignore_patterns("__pycache__"))
        for fname, edit in (("train.py", train_edit), ("README.md", readme_edit)):
            if edit:
                path = folder / fname
                new = edit(path.read_text())
                assert new != path.read_text(), "the edit did not change anything"
                path.write_text(new)
        return folder

    return make


def test_the_template_itself_passes_every_check(broken):
    folder = broken()
    report = rc.probe(folder)
    assert rc.check_files(folder) + rc.check_readme(folder) + rc.check_imports(folder) == []
    assert (rc.check_import_is_inert(report) + rc.check_help(report)
            + rc.check_bad_args(report)) == []
    assert rc.check_teacher_split(folder) == []


@pytest.mark.parametrize("edit, complaint", [
    # the out-dir is made after training (the user finds the typo a minute later, or never)
    (lambda t: t.replace("    prepare_out_dir(cfg.out_dir)  # before", "    pass  # before"),
     "'--out-dir /dev/null/run'"),
    # no range check on the seed: numpy raises a ValueError traceback on -1
    (lambda t: re.sub(r'\n\s*"range": "\[0, 4294967295\]"', "", t),
     "'--seed -1' printed a traceback"),
])
def test_bad_argument_check_catches_late_out_dir_and_negative_seed(broken, edit, complaint):
    problems = rc.check_bad_args(rc.probe(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


def test_help_check_catches_hidden_defaults(broken):
    folder = broken(train_edit=lambda t: t.replace(
        'help=meta["help"] + f" (default: %(default)s{extra})"', 'help=meta["help"]'))
    assert any("does not show the defaults" in p for p in rc.check_help(rc.probe(folder)))


@pytest.mark.parametrize("readme_edit, complaint", [
    (lambda t: t.replace("and compare.\n", "and compare.\n   Expected: the weights shrink.\n"),
     "'Expected:'"),
    (lambda t: t.replace("and compare.\n", "and compare. (For the teacher: they shrink.)\n"),
     "'For the teacher'"),
])
def test_teacher_split_check_catches_answers_in_the_readme(broken, readme_edit, complaint):
    problems = rc.check_teacher_split(broken(readme_edit=readme_edit))
    assert any(complaint in p for p in problems), problems


def test_teacher_split_check_catches_a_missing_teacher_file(broken):
    folder = broken()
    (folder / "TEACHER.md").unlink()
    assert any("TEACHER.md is missing" in p for p in rc.check_teacher_split(folder))


def test_exercise_mark_check_catches_unnumbered_and_missing_marks(broken, tmp_path):
    folder = broken()
    tests = (TEMPLATE.parent / "test_example_paper.py").read_text()
    bad = tmp_path / "test_example_paper.py"
    bad.write_text(tests.replace("@pytest.mark.exercise(2)", "@pytest.mark.exercise"))
    problems = rc.check_exercise_marks(folder, bad)
    assert any("without its number" in p for p in problems), problems
    assert any("exercise 2 has a solution region but no test" in p for p in problems), problems
    assert rc.check_exercise_marks(folder, TEMPLATE.parent / "test_example_paper.py") == []


@pytest.mark.slow
@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace('expect="better",', 'expect="maybe",'), "expect='maybe'"),
    (lambda t: t.replace("    if quick:\n        print(", "    if False:\n        print("),
     "does not warn"),
    (lambda t: t.replace('    print("Files written:"', '    print("Wrote:"'),
     "listing the files"),
    (lambda t: t.replace("    print_verdict(headline, cfg", "    (headline, cfg"),
     "does not end with"),
    (lambda t: t.replace('seen = "method ahead" if ahead else "baseline ahead"',
                         'seen = "baseline ahead" if ahead else "method ahead"'),
     "disagrees with run_all"),
])
def test_quick_run_check_catches_missing_expect_warning_files_and_verdict(broken, edit,
                                                                          complaint):
    problems = rc.check_quick_run(rc.quick_run(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


def test_check_files_catches_a_missing_readme(broken):
    folder = broken()
    (folder / "README.md").unlink()
    assert any("README.md is missing" in p for p in rc.check_files(folder))


@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace("## Key equations\n", "## Equations\n"), "lacks the section '## Key"),
    (lambda t: t.replace("## Run\n", "## Rn\n").replace("## What is logged\n",
                                                         "## What is logged\n\n## Run\n"),
     "is out of order"),
    (lambda t: t.replace("<!-- results:start -->\n", ""), "results markers"),
    (lambda t: re.sub(r"^# .*\n", "", t, count=1, flags=re.M), "no '# Title' line"),
])
def test_check_readme_catches_missing_or_misordered_sections(broken, edit, complaint):
    problems = rc.check_readme(broken(readme_edit=edit))
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize("line, complaint", [
    ("import requests", "imports 'requests'"),
    ("from PIL import Image", "imports 'PIL'"),
    ("from smile import train as other", "imports the folder 'smile'"),
    ("from . import helpers", "relative import"),
])
def test_check_imports_catches_unpinned_sibling_and_relative_imports(broken, line, complaint):
    folder = broken(train_edit=lambda t: t.replace("import numpy as np\n",
                                                    f"import numpy as np\n{line}\n"))
    problems = rc.check_imports(folder)
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize("line, complaint", [
    ('print("hello")', "printed"),
    ('Path("made_at_import.txt").write_text("x")', "created files"),
    ("import threading; threading.Thread(target=__import__('time').sleep, args=(3,)).start()",
     "started threads"),
])
def test_import_check_catches_side_effects(broken, line, complaint):
    folder = broken(train_edit=lambda t: t.replace('FOLDER = "example_paper"\n',
                                                    f'FOLDER = "example_paper"\n{line}\n'))
    problems = rc.check_import_is_inert(rc.probe(folder))
    assert any(complaint in p for p in problems), problems


def test_help_check_catches_a_missing_contract_option(broken):
    folder = broken(train_edit=lambda t: t.replace(
        'flag, meta = "--" + f.name.replace("_", "-"), f.metadata',
        'flag, meta = "--" + f.name, f.metadata'))
    problems = rc.check_help(rc.probe(folder))
    assert any("does not list --out-dir" in p for p in problems), problems


@pytest.mark.parametrize("edit, complaint", [
    # plain argparse prints the usage line and the error: two lines
    (lambda t: t.replace("p = _Parser(", "p = argparse.ArgumentParser("), "want exactly one"),
    # no range check: --steps -3 runs on (and here crashes on an empty history)
    (lambda t: t.replace('"earlier)", "range": "[1, inf)"}', '"earlier)"}'), "'--steps -3'"),
    # a range check that raises instead of calling p.error
    (lambda t: t.replace("    if problem:\n        p.error(problem)",
                         "    if problem:\n        raise ValueError(problem)"),
     "printed a traceback"),
    # no choices on --device: tpu is accepted
    (lambda t: t.replace('choices=meta.get("choices"),', "choices=None,"),
     "'--device tpu' exited 0"),
])
def test_bad_argument_check_catches_tracebacks_and_silent_acceptance(broken, edit, complaint):
    problems = rc.check_bad_args(rc.probe(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# The layout and design-record checks fail on broken copies of the template
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace("Reading map (the paper", "Map (the paper"), "no reading map"),
    (lambda t: t.replace('"help": "learning rate eta", "range": "(0, inf)"',
                         '"help": "learning rate eta"'), "Config.lr (float) has no 'range'"),
    (lambda t: t.replace("# %% 3. The paper:", "# %% 3. The method:"),
     "the cell after Config is not"),
    (lambda t: t.replace('    """PAPER: one step of gradient descent',
                         '    """One step of gradient descent'),
     "'gradient_step' in the paper cell carries no '# PAPER:' tag"),
    (lambda t: t.replace("# %% Try it:", "# %% Play:"), "no '# %% Try it' cell"),
    (lambda t: t.replace("if IN_NOTEBOOK:\n    X_try", "if True:\n    X_try"),
     "must run only under 'if IN_NOTEBOOK:'"),
    (lambda t: t.replace('IN_NOTEBOOK = "ipykernel" in sys.modules\n', "") + (
        '\nIN_NOTEBOOK = "ipykernel" in sys.modules\n'), "IN_NOTEBOOK is not set with the imports"),
    (lambda t: t.replace("        return f\"--{f.name.replace('_', '-')} must be in",
                         "        return f\"{f.name} must be in"),
     "the Appendix differs from the template's"),
    (lambda t: t.replace("# %% Appendix: run plumbing", "# %% Plumbing"), "no Appendix cell"),
])
def test_layout_check_catches_each_departure_from_the_paper_first_order(broken, edit, complaint):
    problems = rc.check_layout(broken(train_edit=edit), template=TEMPLATE / "train.py")
    assert any(complaint in p for p in problems), problems


def test_layout_check_catches_report_defined_before_train(broken):
    def swap(t):
        start, mid = t.index("def train(cfg: Config)"), t.index("# The claims this run checks")
        rep, end = t.index("def report(results"), t.index("def plot(history")
        return t[:start] + t[rep:end] + t[start:mid] + t[mid:rep] + t[end:]

    problems = rc.check_layout(broken(train_edit=swap), template=TEMPLATE / "train.py")
    assert any("the order is not" in p for p in problems), problems


def _design_summary():
    return {"headline": [
        {"metric": "acc", "higher_is_better": True, "expect": "better",
         "method": {"name": "m", "value": 0.9}, "baseline": {"name": "b", "value": 0.5}},
        {"metric": "acc", "higher_is_better": True, "expect": "level",
         "method": {"name": "m", "value": 0.9}, "baseline": {"name": "ceiling", "value": 0.91},
         "margin": 0.05, "margin_why": "2 standard errors"}],
        "premise": [{"name": "gap", "value": 0.4, "cmp": ">=", "threshold": 0.2, "holds": True},
                    {"name": "ceiling", "value": 0.9, "cmp": None, "threshold": None,
                     "holds": None}],
        "arms": {"m": {"data": "train", "init": "zeros", "lr": 0.1, "steps": 30},
                 "b": {"data": "labels", "init": "none", "steps": 0}}}


def _set(path, value):
    def edit(s):
        *keys, last = path
        for k in keys:
            s = s[k]
        if value is _DROP:
            del s[last]
        else:
            s[last] = value
    return edit


_DROP = object()


@pytest.mark.parametrize("edit, complaint", [
    (_set(("premise",), []), "'premise' must be a non-empty list"),
    (_set(("premise", 0, "holds"), False), "holds=False but"),
    (_set(("premise", 0, "cmp"), None), "a reported value has no threshold"),
    (_set(("premise", 0, "note"), "x"), "keys must be"),
    (_set(("arms",), {}), "'arms' must be a non-empty dict"),
    (_set(("arms", "m", "init"), _DROP), "arm 'm' lacks init"),
    (_set(("arms", "b", "steps"), _DROP), "arm 'b' lacks steps|checkpoint"),
    (_set(("headline", 0, "method", "name"), "other"), "the method 'other' is not an arm"),
    (_set(("headline", 1, "margin"), _DROP), "has no 'margin'"),
    (_set(("headline", 1, "margin_why"), ""), "needs its 'margin_why'"),
    (_set(("headline", 1, "margin"), -0.1), "margin must be a number > 0"),
])
def test_design_check_catches_missing_premise_arms_and_margins(edit, complaint):
    summary = _design_summary()
    assert rc.check_design(summary) == []
    edit(summary)
    problems = rc.check_design(summary)
    assert any(complaint in p for p in problems), problems


@pytest.mark.slow
@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace("    print_premise(premise)\n", ""), "does not print its premise"),
    (lambda t: t.replace("    print_premise(premise)\n", "").replace(
        "    return summary\n\n\ndef plot", "    print_premise(premise)\n    return summary\n\n\n"
                                           "def plot"), "printed after the verdict"),
    (lambda t: t.replace('"arms": results["arms"]', '"arms": {}').replace(
        'results["arms"])', "{})"), "'arms' must be a non-empty dict"),
    (lambda t: t.replace("| logistic (method) |", "| logistic |"), "does not mark the paper's"),
])
def test_quick_run_check_catches_a_missing_or_late_premise_and_missing_arms(broken, edit,
                                                                           complaint):
    problems = rc.check_quick_run(rc.quick_run(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


@pytest.mark.slow
@pytest.mark.parametrize("edit, complaint", [
    (lambda t: t.replace("figsize=(9, 4.5)", "figsize=(16, 3.2)").replace("dpi=100)", "dpi=80)"),
     "want at least 900x300"),
    (lambda t: t.replace("figsize=(9, 4.5)", "figsize=(12, 5)").replace("dpi=100)", "dpi=80)"),
     "saved at 80 dpi"),
    (lambda t: t.replace('    ax.set_ylabel("loss, Eq. (2)")\n', ""), "has no y label"),
    (lambda t: t.replace('    ax.set_xlabel("gradient step")\n', ""), "has no x label"),
    (lambda t: t.replace("logistic regression (the method)", "logistic regression"),
     "marks the paper's method"),
])
def test_figure_check_catches_small_unlabelled_or_anonymous_figures(broken, edit, complaint):
    problems = rc.check_figures(rc.quick_run(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


def test_quick_budget_check_catches_a_slow_quick_run():
    assert rc.check_quick_budget({"cpu_seconds": 7.9}, budget=8) == []
    assert "took 9.0 CPU-s" in rc.check_quick_budget({"cpu_seconds": 9.0}, budget=8)[0]
    assert rc.check_quick_budget({"cpu_seconds": 12.0}) == []  # within the load slack
    assert rc.check_quick_budget({"cpu_seconds": 13.0}) != []
