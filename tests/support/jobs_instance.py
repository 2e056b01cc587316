"""A jobs service (`python -m jobs`) as a child process on a free loopback port, for tests and
tests/support/fuzz_api.py: started against a given Redis and TorchServe, stopped (SIGTERM, then SIGKILL) or killed by
its pid."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from torchserve_instance import ROOT, ServerProcess, free_port


class JobsInstance(ServerProcess):
    def __init__(self, workdir: Path, redis_url: str, torchserve=None, **settings):
        """`torchserve`: a TorchServeInstance; `settings`: more STYLE_JOBS_* values, by lower-case name."""
        self.workdir = Path(workdir)
        self.port = free_port()
        self.env = {"STYLE_JOBS_REDIS_URL": redis_url, "STYLE_JOBS_LISTEN": f"127.0.0.1:{self.port}",
                    "STYLE_JOBS_TOKEN_FILE": str(self.workdir / "jobs_token"), "STYLE_JOBS_HEARTBEAT_SECONDS": "0.5"}
        if torchserve is not None:
            self.env.update({"STYLE_JOBS_TORCHSERVE_URL": torchserve.url("inference"),
                             "STYLE_JOBS_TORCHSERVE_MANAGEMENT_URL": torchserve.url("management"),
                             "STYLE_JOBS_TORCHSERVE_KEY_FILE": str(torchserve.workdir / "key_file.json")})
        self.env.update({f"STYLE_JOBS_{name.upper()}": str(value) for name, value in settings.items()})

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def token(self) -> str:
        return (self.workdir / "jobs_token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def log_path(self) -> Path:
        return self.workdir / "jobs.log"

    def start(self, timeout: float = 30) -> "JobsInstance":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "jobs"], cwd=ROOT, env={**os.environ, **self.env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or a lost node would: no chance to give jobs back."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None
