"""Write Jupyter notebooks (.ipynb) of the paper files, with jupytext.

    python tools/make_notebooks.py smile mico          # -> notebooks/smile.ipynb, mico.ipynb
    python tools/make_notebooks.py --all               # every paper folder
    python tools/make_notebooks.py smile --student     # bundle + student/smile/smile/train.ipynb
    python tools/make_notebooks.py smile --execute     # also run it top to bottom (nbclient)

Every `train.py` is written in jupytext's "percent" format: each `# %%` line starts a cell, in
reading order, so the notebook is the file, cell for cell. Its last cell calls `main()`; inside a
kernel `main()` never parses the kernel's own command line and runs the `--quick` configuration
(change it with `main(["--steps", "300"])` in a new cell), and figures show inline.
The module docstring becomes the notebook's first markdown cell (the reading map, rendered);
the `Try it` cells after the paper's code run it on tiny inputs, so the notebook teaches in order.
A student notebook sits beside its `train.py` and is paired with it (jupytext metadata
`formats: ipynb,py:percent`): with jupytext in Jupyter, saving one updates the other, and
`tools/grade.py` grades whichever the student changed last. To open one:
`pip install jupyterlab && jupyter lab notebooks/smile.ipynb`.
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


def docstring_markdown(source: str) -> str | None:
    """A cell holding only the module docstring, as markdown: the title as a heading, the rest
    as written (its indented tables stay code blocks). None if the cell is not a docstring."""
    import ast

    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if len(body) != 1 or not isinstance(body[0], ast.Expr) or not isinstance(
            getattr(body[0], "value", None), ast.Constant) or not isinstance(
            body[0].value.value, str):
        return None
    lines = body[0].value.value.strip().splitlines()
    out = [f"# {lines[0]}"]
    for line in lines[1:]:
        # a line that opens an indented block needs a blank line above it to render as code
        if line.startswith("    ") and out[-1].strip() and not out[-1].startswith("    "):
            out.append("")
        out.append(line)
    return "\n".join(out)


def to_notebook(train_py: Path, folder: str, extra: str = "",
                paired: bool = False) -> nbformat.NotebookNode:
    """The notebook of one train.py: a short markdown cell on top, the docstring rendered."""
    nb = jupytext.read(train_py, fmt="py:percent")
    source = train_py.relative_to(ROOT) if train_py.is_relative_to(ROOT) else train_py
    if nb.cells and nb.cells[0].cell_type == "code":
        md = docstring_markdown(nb.cells[0].source)
        if md is not None:
            nb.cells[0] = nbformat.v4.new_markdown_cell(md)
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(
        INTRO.format(folder=folder, source=source, extra=extra)))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    if paired:
        nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    """Run every cell in a fresh python3 kernel started in cwd (raises on the first error)."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    # The kernel inherits our environment. MPLBACKEND=Agg (set by CI and by run_all) would stop
    # matplotlib from picking the kernel's inline backend, and no figure would show.
    # A progress bar in a saved notebook is dozens of stderr fragments: the log lines say the same.
    saved = os.environ.pop("MPLBACKEND", None), os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        return client.execute()
    finally:
        if saved[0] is not None:
            os.environ["MPLBACKEND"] = saved[0]
        if saved[1] is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved[1]


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
                                                 make_exercises.find_tests_dir(folder),
                                                 notebook=True)
            except make_exercises.FenceError as e:
                print(f"make_notebooks.py: error: {e}", file=sys.stderr)
                return 2
            bundle = Path(args.student_out) / folder.name
            src, dest = bundle / folder.name / "train.py", bundle / folder.name / "train.ipynb"
            extra = ("\nThe coding exercises raise `NotImplementedError` until you fill them in; "
                     "check them with `python -m pytest -m exercise` in the bundle's folder.\n")
        else:
            src, dest = folder / "train.py", Path(args.out) / f"{folder.name}.ipynb"
            extra = ""
        nb = to_notebook(src, folder.name, extra, paired=args.student)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if args.execute:
            nb = execute(nb, dest.parent)
        nbformat.write(nb, dest)
        print(f"wrote {dest}" + (" (executed)" if args.execute else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
