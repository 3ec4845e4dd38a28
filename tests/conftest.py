"""Shared pytest set-up.

`pyproject.toml` puts the repo root on sys.path, so a test imports a folder as
`from smile import train as smile`. To grade a student copy made by tools/make_exercises.py, point
PAPERS_DIR at the directory that holds the copied folders; it goes first on sys.path, so the same
tests import the student's train.py instead of the reference:

    python tools/make_exercises.py smile --out student
    PAPERS_DIR=student pytest tests/test_smile.py -m exercise
"""

import os
import sys
from pathlib import Path

import pytest

# Multi-threaded BLAS on tiny matrices is slow, and ruinous on a busy 2-core machine (one folder's
# k-means step: 10 s with default threads, 1.6 s with one). The tests are about values, not speed.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

PAPERS_DIR = os.environ.get("PAPERS_DIR")
if PAPERS_DIR:
    sys.path.insert(0, str(Path(PAPERS_DIR).resolve()))


def pytest_report_header(config):
    where = Path(PAPERS_DIR).resolve() if PAPERS_DIR else "the repo root (reference solutions)"
    return f"paper folders imported from: {where}"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests call train() directly, skipping main() where each folder sets its thread count.

    Tiny models run several times faster on one thread, and a busy machine makes the default
    (one thread per core) far slower still, so every test runs on one. Session scope: it is set
    up before any module-scoped fixture (some of which train models), after collection has
    imported torch.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
