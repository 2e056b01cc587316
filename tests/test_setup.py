"""scripts/setup.sh checks its prerequisites and says what to install, and never leaves a .venv/ without pip
behind (which every later run would trip over). Run on a copy of the script, so that the real .venv/ is untouched;
Debian's Python without python3-venv is played by a Python whose ensurepip cannot be imported, as on Debian."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT


@pytest.fixture
def checkout(tmp_path):
    """A folder with scripts/setup.sh and requirements.txt, as the script expects the repository."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    return tmp_path


def fake_command(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def python_without_venv(tmp_path):
    """An environment in which python3 lacks ensurepip, as Debian's does until python3-venv is installed."""
    stub = tmp_path / "no-ensurepip"
    stub.mkdir()
    (stub / "ensurepip.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    return {**os.environ, "PYTHONPATH": str(stub)}


def setup(checkout, *args, env=None):
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          timeout=60, env=env or os.environ)


def test_without_python3_venv_it_says_what_to_install_and_makes_no_venv(checkout, python_without_venv):
    run = setup(checkout, env=python_without_venv)
    assert run.returncode == 1
    assert "apt-get install python3-venv" in run.stderr
    assert not (checkout / ".venv").exists()


def test_a_venv_left_without_pip_is_made_again_not_kept(checkout, python_without_venv):
    fake_command(checkout / ".venv" / "bin", "python", "echo 'No module named pip' >&2; exit 1")
    run = setup(checkout, env=python_without_venv)
    assert "no working pip" in run.stderr
    assert not (checkout / ".venv").exists(), "the broken .venv/ must not survive"


@pytest.mark.parametrize("version, accepted", [('openjdk version "11.0.22" 2024-01-16', False),
                                               ('java version "1.8.0_402"', False),
                                               ('openjdk version "17.0.13" 2024-10-15', True),
                                               ('openjdk version "21" 2023-09-19', True)])
def test_serving_needs_java_17(checkout, python_without_venv, tmp_path, version, accepted):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "java", f"echo '{version}' >&2")
    env = {**python_without_venv, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = setup(checkout, "--serving", env=env)
    assert run.returncode == 1  # the Python without venv stops it after the Java check in any case
    said_java = "needs Java 17 or newer" in run.stderr and "openjdk-17-jre-headless" in run.stderr
    assert said_java != accepted, run.stderr


def test_serving_without_java_says_what_to_install(checkout, tmp_path):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "java", "exit 127")
    run = setup(checkout, "--serving", env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert run.returncode == 1
    assert "found: none" in run.stderr and "apt-get install openjdk-17-jre-headless" in run.stderr
