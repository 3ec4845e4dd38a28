"""tools/sync_appendix.py copies the template's Appendix into a folder, and --check finds drift."""

import shutil
import sys

import pytest

import repo_checks as rc

sys.path.insert(0, str(rc.ROOT / "tools"))
import sync_appendix  # noqa: E402

pytestmark = pytest.mark.repo


def test_sync_restores_a_drifted_appendix_and_check_reports_it(tmp_path, capsys):
    folder = tmp_path / "smile"
    folder.mkdir()
    text = rc.TEMPLATE_TRAIN.read_text()
    (folder / "train.py").write_text(text.replace("never a traceback.", "never a trace."))
    assert sync_appendix.main(["smile", "--root", str(tmp_path), "--check"]) == 1
    assert "Appendix differs in: smile" in capsys.readouterr().out
    assert sync_appendix.main(["smile", "--root", str(tmp_path)]) == 0
    assert (folder / "train.py").read_text() == text
    assert sync_appendix.main(["smile", "--root", str(tmp_path), "--check"]) == 0


def test_sync_refuses_a_named_folder_without_an_appendix(tmp_path, capsys):
    shutil.copytree(rc.ROOT / "tests" / "example" / "example_paper", tmp_path / "mico")
    path = tmp_path / "mico" / "train.py"
    path.write_text(path.read_text().replace(rc.APPENDIX_MARK, "# %% Plumbing"))
    assert sync_appendix.main(["mico", "--root", str(tmp_path)]) == 2
    assert "has no '# %% Appendix" in capsys.readouterr().err
