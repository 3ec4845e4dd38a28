"""Write a student bundle of a paper folder: every solution region becomes a NotImplementedError.

    python tools/make_exercises.py smile                 # -> student/smile/ (a bundle)
    python tools/make_exercises.py smile mico --out /tmp/hw   # -> /tmp/hw/smile/, /tmp/hw/mico/
    cd student/smile && python -m pytest -m exercise     # the student checks their work
    PAPERS_DIR=student/smile pytest tests/test_smile.py -m exercise   # the teacher, same tests
    python tools/grade.py submissions/ --folder smile    # the teacher, a whole class

A bundle holds `smile/` (the folder, solutions stripped, the teacher notes `TEACHER.md` left out),
`tests/test_smile.py` with the shared `tests/conftest.py`, a `pytest.ini` and a short README, so
it runs on its own.

A region in a .py file of the folder looks like

    # BEGIN SOLUTION (exercise 2)
    # Exercise 2: compute the load-balancing loss of Eq. (4).
    # (more comment lines: the hint)
    ...reference code...
    # END SOLUTION

In the student copy the fences and the leading comment lines stay (they tell the student where to
write and what to do); the reference code between them becomes one line at the BEGIN line's
indentation:

    raise NotImplementedError("Exercise 2: compute the load-balancing loss of Eq. (4).")

Every other byte of every file is copied unchanged. A file with an unbalanced or nested fence, or a
region with no code in it, is refused with a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION \(exercise (?P<n>\d+)\)[ \t\r]*$")
END = re.compile(r"^[ \t]*# END SOLUTION[ \t\r]*$")


class FenceError(ValueError):
    """A malformed solution region; the message names the file and line."""


def region_spans(lines: list[str], name: str = "<text>"):
    """Yield (begin, end, n, indent) for each solution region, in order: the line indices of its
    BEGIN and END fences, its exercise number and the BEGIN line's indentation.

    The fences are checked as the walk goes (an END without a BEGIN, a malformed BEGIN, a BEGIN
    inside a region, a BEGIN without an END), lazily, so a caller's own check of one region runs
    before any error further down the file is found. `tools/grade.py` reads regions with it too.
    """
    i = 0
    while i < len(lines):
        line = lines[i]
        if END.match(line):
            raise FenceError(f"{name}:{i + 1}: '# END SOLUTION' without a BEGIN")
        m = BEGIN.match(line)
        if not m:
            if "BEGIN SOLUTION" in line and line.lstrip().startswith("#"):
                raise FenceError(f"{name}:{i + 1}: malformed fence, want "
                                 "'# BEGIN SOLUTION (exercise N)'")
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not END.match(lines[i]):
            if BEGIN.match(lines[i]):
                raise FenceError(f"{name}:{i + 1}: a BEGIN SOLUTION inside the region that "
                                 f"starts at line {start + 1}")
            i += 1
        if i == len(lines):
            raise FenceError(f"{name}:{start + 1}: BEGIN SOLUTION (exercise {m['n']}) has no "
                             "'# END SOLUTION'")
        yield start, i, int(m["n"]), m["indent"]
        i += 1


def strip_solutions(text: str, name: str = "<text>") -> tuple[str, list[int]]:
    """Return (student text, exercise numbers of the regions replaced, in order)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    numbers: list[int] = []
    last = 0
    for start, end, n, indent in region_spans(lines, name):
        out += lines[last:start + 1]  # everything up to and including the BEGIN line
        body = lines[start + 1:end]
        # The leading comment lines stay: they are the exercise's prompt and hints.
        k = 0
        while k < len(body) and body[k].strip().startswith("#"):
            k += 1
        out += body[:k]
        if not any(ln.strip() for ln in body[k:]):
            raise FenceError(f"{name}:{start + 1}: region of exercise {n} holds no code")
        prompt = body[0].strip().lstrip("#").strip() if k else f"exercise {n}"
        if not prompt.lower().startswith(f"exercise {n}"):
            prompt = f"Exercise {n}: {prompt}"
        newline = "\r\n" if lines[start].endswith("\r\n") else "\n"
        literal = json.dumps(prompt, ensure_ascii=False)  # a valid Python string literal too
        out.append(f"{indent}raise NotImplementedError({literal}){newline}")
        out.append(lines[end])  # the END line
        numbers.append(n)
        last = end + 1
    out += lines[last:]
    return "".join(out), numbers


TEACHER_FILES = ("TEACHER.md",)  # answers and expected observations: never in a student copy

PYTEST_INI = """\
# Written by tools/make_exercises.py: run `python -m pytest -m exercise` here to check your work.
[pytest]
testpaths = tests
pythonpath = .
addopts = -ra --strict-markers --import-mode=importlib -p no:cacheprovider
markers =
    slow: takes more than a few seconds
    exercise(n): grades coding exercise n
    {folder}: this folder's tests
filterwarnings =
    ignore::DeprecationWarning
    ignore::FutureWarning
"""

BUNDLE_README = """\
# {folder}: your exercise copy

Everything you need for this folder's exercises, on its own: the method with the coding
exercises blanked out, the tests that grade them, and the packages they need.

## Set-up (once, about 5 minutes)

You need Python 3.11 (`python3 --version`). In this folder:

```bash
python3 -m venv .venv && source .venv/bin/activate     # Windows: .venv\\Scripts\\activate
pip install -r requirements.txt                          # CPU-only PyTorch, about 1 GB
```

## What is here

- `{folder}/train.py`: the method, with each coding exercise's solution replaced by
  `raise NotImplementedError("Exercise N: ...")` between its `# BEGIN SOLUTION (exercise N)` and
  `# END SOLUTION` fences. Write your code there, between the fences; change nothing else.
- `{folder}/README.md`: the paper, the run command and the exercises (coding and experiment).
- `tests/`: the same tests your teacher grades with.{notebook}

## Work

```bash
python -m pytest -m exercise             # check your coding exercises (all of them)
python -m pytest -m exercise -k ex2      # one of them: a test's name says which
python {folder}/train.py --quick         # a smoke run; it names the exercises still to do
python {folder}/train.py                 # the full run, once they pass
```

Exercise numbers in this copy: {numbers}. Hand in `{folder}/train.py`{hand_in}.
"""

NOTEBOOK_NOTE = """
- `{folder}/train.ipynb`: the same file as a notebook, cell by cell (the `Try it` cells show the
  method on tiny inputs). Open it with `pip install jupyterlab && jupyter lab {folder}/train.ipynb`.
  It is paired with `train.py` (jupytext): work in either; your teacher grades whichever you
  changed last."""

# Packages the bundle does not need: the repo's linter and its parallel test runner.
DEV_ONLY = ("ruff", "pytest-xdist")


def bundle_requirements(root: Path = ROOT) -> str:
    """The repo's pinned requirements, less the developer-only tools."""
    keep = []
    for line in (root / "requirements.txt").read_text().splitlines():
        name = re.split(r"[=<>!~ \[]", line.split("#")[0].strip())[0].lower()
        if name not in DEV_ONLY:
            keep.append(line)
    return "\n".join(keep).rstrip() + "\n"


# What a student copy of a folder README must not point to: files it does not contain.
TEACHER_ONLY = re.compile(r"TEACHER\.md|tools/|make_exercises|RESULTS\.md")


def student_readme(text: str) -> str:
    """The folder README for a student copy: paragraphs and code blocks that point to files the
    bundle lacks (the teacher notes, the repo's tools, RESULTS.md) are left out."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        current.append(line)
        if not fenced and (line.strip() == "" or line.startswith("```")):
            blocks.append("".join(current))
            current = []
    blocks.append("".join(current))
    kept = [b for b in blocks if not TEACHER_ONLY.search(b) or b.lstrip().startswith("#")]
    return re.sub(r"\n{3,}", "\n\n", "".join(kept))


def make_student_copy(folder: Path, out: Path, tests_dir: Path | None = None,
                      notebook: bool = False) -> dict[str, list[int]]:
    """Write the student bundle out/<folder>/ and return {file: [exercise numbers]}.

    The bundle stands alone: `<folder>/` (the folder with the solutions stripped and the teacher
    notes left out), `tests/test_<folder>.py` and `tests/conftest.py` (when `tests_dir` holds
    them), a `pytest.ini`, a `requirements.txt` and a README (which names the paired
    notebook when `notebook`: make_notebooks.py writes it). A student checks their work with
    `cd out/<folder> && python -m pytest -m exercise`; a teacher grades the same copy with
    `PAPERS_DIR=out/<folder> pytest tests/test_<folder>.py -m exercise` or `tools/grade.py`.
    """
    if not (folder / "train.py").is_file():
        raise FenceError(f"{folder} is not a paper folder (no train.py)")
    # Check every file before writing anything, so a bad fence leaves no half-made copy.
    stripped = {}
    for src in sorted(folder.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        stripped[src] = strip_solutions(src.read_text(), str(src.relative_to(folder.parent)))
    bundle = out / folder.name
    dest = bundle / folder.name
    if folder.resolve() in (bundle.resolve(), *bundle.resolve().parents) or \
            bundle.resolve() in folder.resolve().parents:
        raise FenceError("--out must not contain or be inside the folder itself")
    # Only what this tool writes is replaced; anything else in the bundle (a runs/ folder, a
    # notebook) stays.
    for old in (dest, bundle / "tests"):
        if old.exists():
            shutil.rmtree(old)
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__", "runs",
                                                                *TEACHER_FILES))
    if (dest / "README.md").is_file():
        (dest / "README.md").write_text(student_readme((dest / "README.md").read_text()))
    report = {}
    for src, (text, numbers) in stripped.items():
        (dest / src.relative_to(folder)).write_text(text)
        if numbers:
            report[str(src.relative_to(folder))] = numbers
    if tests_dir is not None and (tests_dir / f"test_{folder.name}.py").is_file():
        (bundle / "tests").mkdir()
        for name in (f"test_{folder.name}.py", "conftest.py"):
            if (tests_dir / name).is_file():
                shutil.copy2(tests_dir / name, bundle / "tests" / name)
    (bundle / "pytest.ini").write_text(PYTEST_INI.format(folder=folder.name))
    (bundle / "requirements.txt").write_text(bundle_requirements())
    numbers = sorted({n for v in report.values() for n in v})
    (bundle / "README.md").write_text(bundle_readme(folder.name, numbers, notebook))
    return report


def bundle_readme(folder: str, numbers: list[int], notebook: bool) -> str:
    """The bundle's own README (set-up, what is here, how to work)."""
    return BUNDLE_README.format(
        folder=folder, numbers=", ".join(map(str, numbers)) or "none",
        notebook=NOTEBOOK_NOTE.format(folder=folder) if notebook else "",
        hand_in=f" (or `{folder}/train.ipynb`)" if notebook else "")


def find_tests_dir(folder: Path) -> Path | None:
    """tests/ beside the folder (a paper folder) or above it (the template under tests/)."""
    for cand in (folder.parent / "tests", folder.parent, folder.parent.parent, ROOT / "tests"):
        if (cand / f"test_{folder.name}.py").is_file():
            return cand
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", metavar="folder",
                   help="paper folder(s), e.g. smile (or a path to one)")
    p.add_argument("--out", default=str(ROOT / "student"),
                   help="directory to write the bundles into (default: student/)")
    args = p.parse_args(argv)
    resolved = []
    for name in args.folders:
        folder = Path(name)
        if not folder.is_dir() and (ROOT / name).is_dir():
            folder = ROOT / name
        if not folder.is_dir():
            print(f"make_exercises.py: error: no folder '{name}'", file=sys.stderr)
            return 2
        resolved.append(folder)
    for folder in resolved:
        try:
            report = make_student_copy(folder, Path(args.out), find_tests_dir(folder))
        except FenceError as e:
            print(f"make_exercises.py: error: {e}", file=sys.stderr)
            return 2
        total = sum(len(v) for v in report.values())
        bundle = Path(args.out) / folder.name
        print(f"wrote {bundle} ({total} solution region(s) replaced: "
              + ", ".join(f"{f} {v}" for f, v in report.items()) + ")")
        if total == 0:
            print("note: the folder has no solution regions", file=sys.stderr)
        print(f"  student: cd {bundle} && python -m pytest -m exercise")
        print(f"  teacher: PAPERS_DIR={bundle} pytest tests/test_{folder.name}.py -m exercise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
