"""Write the student copy of a paper folder: every solution region becomes a NotImplementedError.

    python tools/make_exercises.py smile                 # -> student/smile/
    python tools/make_exercises.py smile --out /tmp/hw   # -> /tmp/hw/smile/
    PAPERS_DIR=student pytest tests/test_smile.py -m exercise   # grade it with the same tests

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


def strip_solutions(text: str, name: str = "<text>") -> tuple[str, list[int]]:
    """Return (student text, exercise numbers of the regions replaced, in order)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    numbers: list[int] = []
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
            out.append(line)
            i += 1
            continue
        start, n, indent = i, int(m["n"]), m["indent"]
        out.append(line)
        i += 1
        # The leading comment lines stay: they are the exercise's prompt and hints.
        prompt = None
        while i < len(lines) and lines[i].strip().startswith("#") and not END.match(lines[i]):
            if BEGIN.match(lines[i]):
                raise FenceError(f"{name}:{i + 1}: a BEGIN SOLUTION inside the region that "
                                 f"starts at line {start + 1}")
            if prompt is None:
                prompt = lines[i].strip().lstrip("#").strip()
            out.append(lines[i])
            i += 1
        code = 0
        while i < len(lines) and not END.match(lines[i]):
            if BEGIN.match(lines[i]):
                raise FenceError(f"{name}:{i + 1}: a BEGIN SOLUTION inside the region that "
                                 f"starts at line {start + 1}")
            code += bool(lines[i].strip())
            i += 1
        if i == len(lines):
            raise FenceError(f"{name}:{start + 1}: BEGIN SOLUTION (exercise {n}) has no "
                             "'# END SOLUTION'")
        if code == 0:
            raise FenceError(f"{name}:{start + 1}: region of exercise {n} holds no code")
        prompt = prompt or f"exercise {n}"
        if not prompt.lower().startswith(f"exercise {n}"):
            prompt = f"Exercise {n}: {prompt}"
        newline = "\r\n" if line.endswith("\r\n") else "\n"
        literal = json.dumps(prompt, ensure_ascii=False)  # a valid Python string literal too
        out.append(f"{indent}raise NotImplementedError({literal}){newline}")
        out.append(lines[i])  # the END line
        numbers.append(n)
        i += 1
    return "".join(out), numbers


def make_student_copy(folder: Path, out: Path) -> dict[str, list[int]]:
    """Copy folder to out/<folder name> with the solutions stripped. Returns {file: [numbers]}."""
    if not (folder / "train.py").is_file():
        raise FenceError(f"{folder} is not a paper folder (no train.py)")
    # Check every file before writing anything, so a bad fence leaves no half-made copy.
    stripped = {}
    for src in sorted(folder.rglob("*.py")):
        if "__pycache__" in src.parts:
            continue
        stripped[src] = strip_solutions(src.read_text(), str(src.relative_to(folder.parent)))
    dest = out / folder.name
    if dest.resolve() == folder.resolve():
        raise FenceError("--out must not be the folder's own parent (it would overwrite it)")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__"))
    report = {}
    for src, (text, numbers) in stripped.items():
        (dest / src.relative_to(folder)).write_text(text)
        if numbers:
            report[str(src.relative_to(folder))] = numbers
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="the paper folder, e.g. smile (or a path to one)")
    p.add_argument("--out", default=str(ROOT / "student"),
                   help="directory to write the copy into (default: student/)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir() and (ROOT / args.folder).is_dir():
        folder = ROOT / args.folder
    if not folder.is_dir():
        print(f"make_exercises.py: error: no folder '{args.folder}'", file=sys.stderr)
        return 2
    try:
        report = make_student_copy(folder, Path(args.out))
    except FenceError as e:
        print(f"make_exercises.py: error: {e}", file=sys.stderr)
        return 2
    total = sum(len(v) for v in report.values())
    dest = Path(args.out) / folder.name
    print(f"wrote {dest} ({total} solution region(s) replaced: "
          + ", ".join(f"{f} {v}" for f, v in report.items()) + ")")
    if total == 0:
        print("note: the folder has no solution regions", file=sys.stderr)
    print(f"grade with: PAPERS_DIR={args.out} pytest tests/test_{folder.name}.py -m exercise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
