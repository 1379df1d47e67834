"""scripts/python_api.py, the documented example of batchlab's Python API, runs as written (its quick study, about
half a minute: slow-marked; tests/test_run_study.py and tests/test_finder.py check the API in the default suite)."""

import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "python_api.py"


@pytest.mark.slow
def test_the_python_api_example_finds_a_batch_size_and_recommends_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["python_api.py", "--out", str(tmp_path / "study")])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "batch size found 1945, stopped because max_val" in out  # 2048, the largest tried, less 5%
    assert "batchlab study (quick)" in out and "recommended batch size " in out
    assert (tmp_path / "study" / "quick.json").is_file()
