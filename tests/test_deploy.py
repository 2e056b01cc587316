"""deploy/: the Dockerfile linted by hadolint (it cannot be built here: no container engine), the container's
TorchServe configuration held to the repository's, and the probes run against a real TorchServe."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
PROBE = DEPLOY / "torchserve_probe.py"

sys.path.insert(0, str(DEPLOY))
from torchserve_probe import drain, established_connections  # noqa: E402


def properties(path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def differing_keys(a: dict, b: dict) -> set[str]:
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


# --- the Dockerfile -------------------------------------------------------------------------------------------

def hadolint(path):
    if not HADOLINT.exists():
        pytest.fail("hadolint is missing from .venv: scripts/setup.sh installs it (requirements.txt)")
    return subprocess.run([str(HADOLINT), "--no-color", "--format", "json", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    lint = hadolint(DOCKERFILE)
    assert (lint.returncode, json.loads(lint.stdout or "[]")) == (0, []), lint.stdout + lint.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    lint = hadolint(bad)
    assert lint.returncode != 0
    assert {"DL3007", "DL3008"} <= {finding["code"] for finding in json.loads(lint.stdout)}


def test_dockerfile_copies_only_files_the_build_context_lets_through():
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in [word for word in line.split()[1:-1] if not word.startswith("--")]:
                assert (ROOT / source).exists(), source
                assert any(source.rstrip("/") == entry or source.startswith(entry + "/") for entry in allowed), source


def test_image_packages_are_pinned_by_requirements():
    install = DOCKERFILE.read_text().split("uv pip install", 1)[1].split("&&", 1)[0]
    packages = [word for word in install.split() if word[0].isalpha()]
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {"torch", "torchserve", "pyyaml"} <= {p.lower() for p in packages}
    assert {p.lower() for p in packages} <= pinned


def test_dockerfile_uses_the_pinned_official_gpu_image_and_never_random_weights():
    text = DOCKERFILE.read_text()
    assert "\nFROM pytorch/torchserve:0.12.0-gpu AS runtime\n" in text
    assert "ARG WEIGHTS=imagenet" in text and "random)" in text and "exit 1" in text


# --- TorchServe configurations --------------------------------------------------------------------------------

def test_container_config_differs_from_the_repository_config_only_where_a_container_needs():
    container, local = properties(DEPLOY / "config.properties"), properties(ROOT / "config.properties")
    assert differing_keys(container, local) == {
        "inference_address", "metrics_address", "grpc_inference_address", "model_store", "metrics_config",
        "allowed_urls", "token_expiration_min"}
    assert container["inference_address"] == "http://0.0.0.0:8080"
    assert container["management_address"].startswith("http://127.0.0.1:")
    assert container["disable_token_authorization"] == "false" and container["enable_model_api"] == "false"
    assert container["allowed_urls"] == "file:///home/model-server/model-store/.*\\\\.mar"


# --- the probes, against a real TorchServe ---------------------------------------------------------------------

def run_probe(*args):
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.integration
def test_probes_pass_with_the_key_torchserve_wrote(server):
    key_file = str(server.workdir / "key_file.json")
    for check in ("ready", "live"):
        result = run_probe(check, "--url", server.url("inference"), "--key-file", key_file)
        assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_probes_fail_with_a_rejected_key_or_no_server(server, tmp_path):
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "wrongkey"}}))
    for check in ("ready", "live"):
        assert run_probe(check, "--url", server.url("inference"), "--key-file", str(wrong)).returncode == 1
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"
    assert run_probe("live", "--url", nobody, "--key-file", str(server.workdir / "key_file.json")).returncode == 1


def test_drain_waits_for_open_connections_to_close():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert established_connections(port) == 1  # the server's end: a request in flight
        assert not drain(port, timeout=0.6, quiet_for=0.2, poll=0.1)
        client.close()
        accepted.close()
        assert established_connections(port) == 0
        assert drain(port, timeout=2, quiet_for=0.2, poll=0.1)
