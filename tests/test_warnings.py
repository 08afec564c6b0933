"""Paddle's import-time "No ccache found" UserWarning is silenced for every entry point; other
warnings still reach the terminal."""
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["train.py", "eval.py", "predict.py", "export_model.py", "infer.py", "serve.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_points_print_no_ccache_warning(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ccache" not in proc.stdout + proc.stderr


def test_only_that_warning_is_silenced():
    # report.visualize is infer.py's first import that loads Paddle (through models/).
    code = ("import warnings, report.visualize, models, paddle\n"
            "warnings.warn('a warning of ours', UserWarning)\n"
            "warnings.warn('No ccache found, said by someone else', DeprecationWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "UserWarning: No ccache found" not in proc.stderr
    assert "UserWarning: a warning of ours" in proc.stderr
    assert "DeprecationWarning: No ccache found, said by someone else" in proc.stderr
