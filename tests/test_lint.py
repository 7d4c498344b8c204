"""The linter is part of the test command: ruff (pinned in the test extra, configured in pyproject.toml) over the
whole tree."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_reports_nothing():
    proc = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
