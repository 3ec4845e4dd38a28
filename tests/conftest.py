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
from _pytest.nodeid import coerce_node_id

# Multi-threaded BLAS on tiny matrices is slow, and ruinous on a busy 2-core machine (one folder's
# k-means step: 10 s with default threads, 1.6 s with one). The tests are about values, not speed.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

PAPERS_DIR = os.environ.get("PAPERS_DIR")
if PAPERS_DIR:
    sys.path.insert(0, str(Path(PAPERS_DIR).resolve()))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`pytest` alone (the README's command) runs on every core with pytest-xdist (pinned): the
    suite is mostly independent CPU-bound runs, so two cores halve its wall time. Naming files
    or tests, `-n N` or `-p no:xdist` keeps the usual behaviour (one process unless -n), so the
    graders' and students' own pytest runs are unchanged. `--dist loadgroup` with the groups of
    `pytest_collection_modifyitems` keeps tests that share a fixture on one worker."""
    if not config.pluginmanager.hasplugin("xdist") or config.option.numprocesses is not None:
        return
    if hasattr(config, "workerinput") or config.args_source != config.ArgsSource.TESTPATHS:
        return
    if config.inipath is None or config.inipath.name != "pyproject.toml":
        return  # a student bundle (its own pytest.ini) keeps one process
    config.option.numprocesses = "auto"
    config.option.dist = "loadgroup"


GRADING_FILES = ("test_tools.py", "test_grade_security.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """In a worker, keep what shares a module-scoped fixture together: a folder's test file is
    one group (its trained models are built once), test_repo.py's checks of one folder are one
    group (they share that folder's probe and --quick run), and the grading tests are one."""
    # In the workers the option that says so is "loadgroup" (set from --dist loadgroup).
    if not hasattr(config, "workerinput"):  # only in a pytest-xdist worker (not a child run
        return                              # that inherited its PYTEST_XDIST_WORKER variable)
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        group = item.path.name
        if item.path.name == "test_repo.py":
            folder = getattr(getattr(item, "callspec", None), "params", {}).get("folder")
            if folder is None:
                continue
            group = f"repo-{Path(folder).name}"
        elif item.path.name in GRADING_FILES:
            # grading tests count the sandbox's processes: two classes graded at once would see
            # each other's workers, so they share one worker
            group = "grading"
        item.add_marker(pytest.mark.xdist_group(group))
        # The scheduler groups by an "@group" suffix of the node id. pytest-xdist 3.8 writes it
        # to `item._nodeid`, which pytest 9.2 no longer reads (the id lives in `item._id`), and
        # the bare command's workers do not know they run loadgroup; so we write it here.
        if "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{group}")


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
