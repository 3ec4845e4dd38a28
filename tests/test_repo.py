"""Repository conventions (CONTRIBUTING.md), checked for every paper folder that exists.

The first half runs each check of `repo_checks.py` on the real folders (and on the template folder,
so the checks always run on something). The second half shows that every check can fail: it breaks
a temporary copy of the template in one specific way and asserts that exactly that check complains.
"""

from __future__ import annotations

import re
import shutil
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
def test_every_coding_exercise_is_graded_by_tests_with_its_number(folder):
    tests = ROOT / "tests" / f"test_{folder.name}.py"
    if folder == TEMPLATE:
        tests = TEMPLATE.parent / "test_example_paper.py"
    assert rc.check_exercise_marks(folder, tests) == []


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_quick_run_ends_with_verdict_warning_and_files_and_rows_say_what_they_claim(folder):
    assert rc.check_quick_run(rc.quick_run(folder)) == []


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
    assert {"runs/", "student/", "__pycache__/"} <= set(ignored)


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
    (lambda t: t.replace("    out = prepare_out_dir(cfg.out_dir)", "    out = Path(cfg.out_dir)"),
     "'--out-dir /dev/null/run'"),
    # no range check on the seed: numpy raises a ValueError traceback on -1
    (lambda t: t.replace("    if not 0 <= cfg.seed < 2**32:\n", "    if False:\n"),
     "'--seed -1' printed a traceback"),
])
def test_bad_argument_check_catches_late_out_dir_and_negative_seed(broken, edit, complaint):
    problems = rc.check_bad_args(rc.probe(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems


def test_help_check_catches_hidden_defaults(broken):
    folder = broken(train_edit=lambda t: t.replace(' + " (default: %(default)s)"', ""))
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
    (lambda t: t.replace(' "expect": "better",', ""), "expect=None"),
    (lambda t: t.replace("    if quick:\n        print(", "    if False:\n        print("),
     "does not warn"),
    (lambda t: t.replace('    print("Files written:"', '    print("Wrote:"'),
     "listing the files"),
    (lambda t: t.replace("    print_verdict(result", "    (result"), "does not end with"),
    (lambda t: t.replace('seen = "method ahead" if better else "baseline ahead"',
                         'seen = "baseline ahead" if better else "method ahead"'),
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
    folder = broken(train_edit=lambda t: t.replace('flag = "--" + f.name.replace("_", "-")',
                                                    'flag = "--" + f.name'))
    problems = rc.check_help(rc.probe(folder))
    assert any("does not list --out-dir" in p for p in problems), problems


@pytest.mark.parametrize("edit, complaint", [
    # plain argparse prints the usage line and the error: two lines
    (lambda t: t.replace("p = _Parser(", "p = argparse.ArgumentParser("), "want exactly one"),
    # no range check: --steps -3 runs on (and here crashes on an empty history)
    (lambda t: t.replace('for name in ("steps", "n", "log_every"):',
                         'for name in ("n", "log_every"):'), "'--steps -3'"),
    # a range check that raises instead of calling p.error
    (lambda t: t.replace("p.error(f\"--{name.replace('_', '-')} must be",
                         "raise ValueError(f\"--{name.replace('_', '-')} must be"),
     "printed a traceback"),
    # no choices on --device: tpu is accepted
    (lambda t: t.replace('choices=DEVICES if f.name == "device" else None', "choices=None"),
     "'--device tpu' exited 0"),
])
def test_bad_argument_check_catches_tracebacks_and_silent_acceptance(broken, edit, complaint):
    problems = rc.check_bad_args(rc.probe(broken(train_edit=edit)))
    assert any(complaint in p for p in problems), problems
