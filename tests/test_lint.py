"""Static checks: unused imports and names, undefined names, syntax errors, lines over 120 characters."""

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F,E9,E501,W6", "--line-length", "120",
                          "--output-format", "concise", "handler", "scripts", "benchmarks", "tests", "deploy", "jobs",
                          "docs"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
