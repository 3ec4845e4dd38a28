"""Copy the template's Appendix cell (run plumbing) into paper folders, byte for byte.

    python tools/sync_appendix.py              # every folder that has an Appendix cell
    python tools/sync_appendix.py smile mico   # just these
    python tools/sync_appendix.py --check      # say which differ; exit 1 if any (changes nothing)

The Appendix is the only code shared verbatim between the ten files (CONTRIBUTING.md, section 3):
change it in `tests/example/example_paper/train.py`, run this, and run the tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from repo_checks import APPENDIX_MARK, PAPER_FOLDERS, TEMPLATE_TRAIN, appendix  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="*", help="paper folders (default: all with an Appendix)")
    p.add_argument("--check", action="store_true", help="report drift, change nothing")
    p.add_argument("--root", default=str(ROOT), help="repo root (default: this repo)")
    args = p.parse_args(argv)
    root = Path(args.root)
    model = appendix(TEMPLATE_TRAIN.read_text())
    drift = []
    for name in args.folders or PAPER_FOLDERS:
        path = root / name / "train.py"
        if not path.is_file():
            print(f"sync_appendix.py: error: no train.py in '{name}'", file=sys.stderr)
            return 2
        text = path.read_text()
        mine = appendix(text)
        if mine is None:
            if args.folders:
                print(f"sync_appendix.py: error: {name}/train.py has no '{APPENDIX_MARK}' cell",
                      file=sys.stderr)
                return 2
            continue
        if mine == model:
            continue
        drift.append(name)
        if not args.check:
            path.write_text(text[:text.index(APPENDIX_MARK)] + model)
            print(f"updated {name}/train.py")
    if args.check and drift:
        print("Appendix differs in: " + ", ".join(drift))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
