"""A jobs service (`python -m jobs`) as a child process on a free loopback port, for tests and
tests/support/fuzz_api.py: started against a given Redis and TorchServe, stopped (SIGTERM, then SIGKILL), stopped
with SIGTERM alone as a rolling restart does, or killed by its pid. Replicas share a token file."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from torchserve_instance import ROOT, ServerProcess, free_port


class JobsInstance(ServerProcess):
    def __init__(self, workdir: Path, redis_url: str, torchserve=None, token_file: Path | None = None,
                 env: dict[str, str] | None = None, **settings):
        """`torchserve`: a TorchServeInstance; `token_file`: another replica's (default: its own, written at
        start); `env`: more environment variables (an object store's credentials); `settings`: more STYLE_JOBS_*
        values, by lower-case name (replicas share object_store and webhook_secret_file, by default their own
        in the workdir)."""
        self.workdir = Path(workdir)
        self.port, self.metrics_port = free_port(), free_port()
        self.token_file = Path(token_file) if token_file else self.workdir / "jobs_token"
        self.env = {"STYLE_JOBS_REDIS_URL": redis_url, "STYLE_JOBS_LISTEN": f"127.0.0.1:{self.port}",
                    "STYLE_JOBS_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
                    "STYLE_JOBS_TOKEN_FILE": str(self.token_file), "STYLE_JOBS_LEASE_SECONDS": "3",
                    "STYLE_JOBS_OBJECT_STORE": str(self.workdir / "objects"),
                    "STYLE_JOBS_WEBHOOK_SECRET_FILE": str(self.workdir / "webhook_secret"), **(env or {})}
        if torchserve is not None:
            self.env.update({"STYLE_JOBS_TORCHSERVE_URL": torchserve.url("inference"),
                             "STYLE_JOBS_TORCHSERVE_MANAGEMENT_URL": torchserve.url("management"),
                             "STYLE_JOBS_TORCHSERVE_KEY_FILE": str(torchserve.workdir / "key_file.json")})
        self.env.update({f"STYLE_JOBS_{name.upper()}": str(value) for name, value in settings.items()})

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def log_path(self) -> Path:
        return self.workdir / "jobs.log"

    @property
    def replica(self) -> str | None:
        """The replica's name, which a job's record names as its owner, as its log says it (the last start's)."""
        found = re.findall(r"jobs: replica (\w+) on http", self.log_path.read_text(errors="replace"))
        return found[-1] if found else None

    def launch(self) -> "JobsInstance":
        """Start the process without waiting for it to answer."""
        if self.process is not None:  # a second one would be nobody's to stop
            raise RuntimeError(f"the jobs service of {self.workdir} runs already")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "jobs"], cwd=ROOT, env={**os.environ, **self.env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def start(self, timeout: float = 30) -> "JobsInstance":
        self.launch()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(self.url("/ping"), timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the jobs service did not start:\n{self.log_tail()}")
            time.sleep(0.1)

    def terminate(self, timeout: float) -> int:
        """SIGTERM to the service alone, as a rolling restart or Ctrl-C sends it; its exit status, which it must
        reach within `timeout` s (subprocess.TimeoutExpired otherwise, and stop() ends it)."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=timeout)
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a lost node would: no chance to give jobs back."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
