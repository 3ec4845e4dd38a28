"""Write Jupyter notebooks (.ipynb) of the paper files, with jupytext.

    python tools/make_notebooks.py smile mico          # -> notebooks/smile.ipynb, mico.ipynb
    python tools/make_notebooks.py --all               # every paper folder
    python tools/make_notebooks.py smile --student     # student bundle + student/smile/smile.ipynb
    python tools/make_notebooks.py smile --execute     # also run it top to bottom (nbclient)

Every `train.py` is written in jupytext's "percent" format: each `# %%` line starts a cell, in
reading order, so the notebook is the file, cell for cell. Its last cell calls `main()`; inside a
kernel `main()` never parses the kernel's own command line and runs the `--quick` configuration
(change it with `main(["--steps", "300"])` in a new cell), and figures show inline.
The notebooks are generated, so they are not committed (`notebooks/` is git-ignored).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
import make_exercises  # noqa: E402

from repo_checks import PAPER_FOLDERS  # noqa: E402

INTRO = """# {folder}: `{source}` as a notebook

Generated from `{source}` by `tools/make_notebooks.py`; each cell is one `# %%` part of the file,
in reading order. Run all cells: the last one calls `main()`, which in a notebook runs the quick
configuration (seconds) and shows its plots inline. For the full run, add a cell with
`main([])`, or `main(["--seed", "1"])`: the same flags as the command line.
{extra}"""


def to_notebook(train_py: Path, folder: str, extra: str = "") -> nbformat.NotebookNode:
    """The notebook of one train.py, with a short markdown cell on top."""
    nb = jupytext.read(train_py, fmt="py:percent")
    source = train_py.relative_to(ROOT) if train_py.is_relative_to(ROOT) else train_py
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(
        INTRO.format(folder=folder, source=source, extra=extra)))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel started in cwd (raises on the first error)."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    # The kernel inherits our environment. MPLBACKEND=Agg (set by CI and by run_all) would stop
    # matplotlib from picking the kernel's inline backend, and no figure would show.
    saved = os.environ.pop("MPLBACKEND", None)
    try:
        return client.execute()
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="paper folders (or paths to them)")
    p.add_argument("--all", action="store_true", help="every paper folder")
    p.add_argument("--out", default=str(ROOT / "notebooks"), help="where reference notebooks go")
    p.add_argument("--student", action="store_true",
                   help="make the student bundle (student/<folder>/) and its notebook instead")
    p.add_argument("--student-out", default=str(ROOT / "student"),
                   help="where student bundles go (default: student/)")
    p.add_argument("--execute", action="store_true", help="run each notebook after writing it")
    args = p.parse_args(argv)
    names = list(PAPER_FOLDERS) if args.all else args.folders
    if not names:
        p.error("name at least one folder, or --all")
    for name in names:
        folder = Path(name) if (Path(name) / "train.py").is_file() else ROOT / name
        if not (folder / "train.py").is_file():
            print(f"make_notebooks.py: error: no train.py in '{name}'", file=sys.stderr)
            return 2
        folder = folder.resolve()
        if args.student:
            try:
                make_exercises.make_student_copy(folder, Path(args.student_out),
                                                 make_exercises.find_tests_dir(folder))
            except make_exercises.FenceError as e:
                print(f"make_notebooks.py: error: {e}", file=sys.stderr)
                return 2
            bundle = Path(args.student_out) / folder.name
            src, dest = bundle / folder.name / "train.py", bundle / f"{folder.name}.ipynb"
            extra = ("\nThe coding exercises raise `NotImplementedError` until you fill them in; "
                     "check them with `python -m pytest -m exercise` in this folder.\n")
        else:
            src, dest = folder / "train.py", Path(args.out) / f"{folder.name}.ipynb"
            extra = ""
        nb = to_notebook(src, folder.name, extra)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if args.execute:
            nb = execute(nb, dest.parent)
        nbformat.write(nb, dest)
        print(f"wrote {dest}" + (" (executed)" if args.execute else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
