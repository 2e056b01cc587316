#!/usr/bin/env python3
"""Fuzz POST /predictions/style_transfer from openapi.yaml with Schemathesis, against a real TorchServe.

    scripts/fuzz_api.py [--max-examples 2000] [--seed N] [--phases coverage,fuzzing] [--max-time SECONDS]
                        [--keep DIR]

Builds an archive with random weights and small maxima (FUZZ_HANDLER: every valid request takes a fraction of
a second), starts a private TorchServe on free loopback ports, and runs `schemathesis run` on the spec as this
server states it: openapi.yaml with the defaults and maxima of the server's own description (the management
API's describe call), since a server may lower the engine's maxima and the spec says so. Then it checks that
the worker that answered every request is the one that started. Prints Schemathesis's report and a tally of
the answers by status and content type; exits 1 when Schemathesis found anything or the worker changed.

What Schemathesis checks (besides our checks in scripts/fuzz_api_hooks.py): no 5xx but the documented 503 and
507, and TorchServe's 500 for a multipart body it cannot decode; every status, content type, header and JSON
body as the spec documents it. EXCLUDED_CHECKS says which of its checks are left out, and why.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import requests
import yaml

from build_mar import build
from torchserve_instance import MODEL_NAME, ROOT, VENV_BIN, TorchServeInstance

SPEC = ROOT / "openapi.yaml"
HOOKS = ROOT / "scripts" / "fuzz_api_hooks.py"
_HANDLER = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
# Small maxima, so that whatever the fuzzer sends is answered within a second or two on 2 CPU cores. The
# engine's defaults (256 px, 200 steps) are over them: the server sets its own, as a server may.
FUZZ_HANDLER = {**_HANDLER, "reply_margin_seconds": 6, "device_overrides": {},
                "defaults": {"size": 64, "steps": 5, "max_seconds": 3},
                "maxima": {"size": 96, "steps": 10, "max_seconds": 3}}
# One request at a time: waiting maxBatchDelay (50 ms) for a batch that never comes would be most of each answer.
FUZZ_SETTINGS = {"responseTimeout": 20, "maxBatchDelay": 1, "handler": FUZZ_HANDLER}
# Only statuses under 500 are fine to Schemathesis: 503 and 507 are documented answers of a working server, and
# so is TorchServe's own 500 for a multipart body its decoder refuses, which the model never sees (the hook
# `a_500_is_torchserves_own` fails every other 500, our handler's InternalError included).
CONFIG = """\
[checks.not_a_server_error]
expected-statuses = ["2XX", "4XX", "500", "503", "507"]
"""
# Schemathesis's checks that TorchServe 0.12 fails whatever the model does, or that ask more than the contract.
EXCLUDED_CHECKS = {
    "ignored_auth": "TorchServe refuses a missing or wrong token with 400, where this check wants 401 or 403 "
                    "(tests/test_security.py shows that every API refuses it)",
    "missing_required_header": "the one required header is Authorization, and the same 400 answers its absence",
    "unsupported_method": "TorchServe hands every method on /predictions to the model (the spec says so)",
    "negative_data_rejection": "the server reads more than the schema promises: numbers as text, choices in "
                               "any case; what it refuses it answers with a documented 400",
    "positive_data_acceptance": "a request the schema allows may still break a rule no schema states (images "
                                "that do not decode, one style_blend weight per style): a documented 400",
}


def server_view(spec: dict, description: dict) -> dict:
    """The spec as a TorchServe states it: only the paths it serves (the jobs API's paths name their own
    server, the jobs service), its defaults, and its maxima where it lowers the engine's."""
    spec = copy.deepcopy(spec)
    spec["paths"] = {path: item for path, item in spec["paths"].items() if "servers" not in item}
    params = spec["components"]["schemas"]["Params"]["properties"]
    for parameter in description["parameters"]:
        # TorchServe leaves JSON nulls out of the description: a default of null comes as no default at all
        params[parameter["name"]]["default"] = parameter.get("default")
    for name, maximum in description["limits"]["maxima"].items():
        params[name]["maximum"] = maximum
    return spec


def describe(server: TorchServeInstance) -> dict:
    """The handler's own description of the model (docs/api.md, "The model's description")."""
    response = requests.get(server.url("management", f"/models/{MODEL_NAME}?customized=true"),
                            headers=server.auth("management"), timeout=60)
    response.raise_for_status()
    return response.json()[0]["customizedMetadata"]


def run_schemathesis(server: TorchServeInstance, workdir: Path, *, seed: int, max_examples: int, phases: str,
                     max_time: int | None = None) -> subprocess.CompletedProcess:
    """`schemathesis run` against `server`, one request at a time; its HAR report goes to workdir/answers.har."""
    spec = workdir / "openapi-server-view.yaml"
    spec.write_text(yaml.safe_dump(server_view(yaml.safe_load(SPEC.read_text()), describe(server)), sort_keys=False))
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [str(VENV_BIN / "schemathesis"), "--config-file", str(config), "--no-color", "run", str(spec),
               "--url", server.url("inference"), "--header", f"Authorization: Bearer {server.key()}",
               "--workers", "1", "--seed", str(seed), "--max-examples", str(max_examples), "--phases", phases,
               "--exclude-checks", ",".join(EXCLUDED_CHECKS), "--generation-database", "none",
               "--report", "har", "--report-har-path", str(workdir / "answers.har"),
               "--report-dir", str(workdir / "report"), "--warnings", "off"]
    if max_time is not None:
        command += ["--max-time", str(max_time)]
    return subprocess.run(command, cwd=workdir, env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
                          capture_output=True, text=True)


def answers(har_file: Path) -> Counter:
    """How many answers the run got, by method, status and content type (from Schemathesis's HAR report)."""
    entries = json.loads(har_file.read_text())["log"]["entries"]
    return Counter((entry["request"]["method"], entry["response"]["status"],
                    entry["response"]["content"].get("mimeType", "").split(";")[0]) for entry in entries)


def fuzz_server(store: Path, workdir: Path) -> TorchServeInstance:
    """A TorchServe (not yet started) serving a random-weights archive with FUZZ_SETTINGS."""
    build("random", store, settings=FUZZ_SETTINGS)
    return TorchServeInstance(store, workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=2000, help="generated requests per phase, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default="coverage,fuzzing")
    parser.add_argument("--max-time", type=int, help="seconds for the whole Schemathesis run")
    parser.add_argument("--keep", type=Path, help="keep the server's logs and the reports in this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz_api-") as scratch:
        workdir = args.keep or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        with fuzz_server(workdir / "store", workdir / "torchserve") as server:
            workers = server.worker_pids()
            run = run_schemathesis(server, workdir, seed=args.seed, max_examples=args.max_examples,
                                   phases=args.phases, max_time=args.max_time)
            print(run.stdout, run.stderr, sep="\n")
            for (method, status, media_type), count in sorted(answers(workdir / "answers.har").items()):
                print(f"fuzz_api: {count:5d} x {method} {status} {media_type or '(no content)'}")
            same_worker = server.worker_pids() == workers
    if not same_worker:
        print(f"fuzz_api: the worker changed during the run (was {workers})", file=sys.stderr)
    return 0 if run.returncode == 0 and same_worker else 1


if __name__ == "__main__":
    sys.exit(main())
