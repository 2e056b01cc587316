"""A private TorchServe instance on free loopback ports, for the local cluster script, benchmarks and tests.

Each instance gets its own working directory (where TorchServe writes key_file.json and logs/) and its own
TMPDIR/TEMP (its pid file and the worker sockets live there), so several run on one machine. Its
config.properties is the repository's with only the addresses, ports and paths changed. TorchServe's
launcher does not pass SIGTERM on to Java, so `stop()` signals the whole process group, waits, then
SIGKILLs what is left. That life cycle (ServerProcess) serves the test instances of the jobs service and Redis
too (tests/support/jobs_instance.py, tests/support/redis_instance.py), as free_port does.
"""

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
MODEL_NAME = "style_transfer"


LOWEST_PORT = 10000
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range where there is room: a server takes seconds
    to bind its ports, and the outgoing connections made meanwhile draw their local ports from that range (a
    port bind(0) gave could be taken by one). Never the same port twice in one process (instances that start
    together)."""
    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(LOWEST_PORT, ephemeral_start) if ephemeral_start - LOWEST_PORT >= 4096 else None
    for _ in range(200):
        port = random.choice(candidates) if candidates else 0
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found")


class ServerProcess:
    """A server that runs as the leader of its own process group (start_new_session) and writes its log to
    `log_path`: stop() ends the whole group (stop_process_group, `stop_grace` seconds before SIGKILL), and `with`
    starts and stops it. Subclasses start it in their start(), which sets `process` and returns the instance."""
    process: subprocess.Popen | None = None
    stop_grace: float = 15
    log_path: Path

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process_group(self.process, self.stop_grace)
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class TorchServeInstance(ServerProcess):
    def __init__(self, model_store: Path, workdir: Path, overrides: dict[str, str] | None = None,
                 env: dict[str, str] | None = None):
        """`overrides`: config.properties settings; `env`: environment variables for the server and its workers."""
        self.model_store, self.workdir = Path(model_store).resolve(), Path(workdir).resolve()
        self.overrides, self.env = overrides or {}, env or {}
        self.ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc_inference",
                                                     "grpc_management")}

    def stop(self) -> None:
        """Java first, so that it stops its workers itself (a signal to the whole group ends a worker, which Java
        then starts again while it shuts down, the slower for it); then the group, as any server's."""
        if self.process is not None:
            for pid in _group_members(self.process.pid, "java"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            _waited(self.process, lambda: not _group_members(self.process.pid, "java"), self.stop_grace)
        super().stop()

    # --- addresses and credentials ---
    def url(self, api: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports['grpc_inference']}"

    def key(self, kind: str = "inference") -> str:
        return json.loads((self.workdir / "key_file.json").read_text())[kind]["key"]

    def auth(self, kind: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(kind)}"}

    @property
    def log_path(self) -> Path:
        return self.workdir / "torchserve.out"

    # --- life cycle ---
    def config_text(self) -> str:
        """The repository's config.properties with this instance's addresses, ports and absolute paths."""
        settings = {
            "inference_address": self.url("inference"), "management_address": self.url("management"),
            "metrics_address": self.url("metrics"),
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store), "metrics_config": str(ROOT / "metrics.yaml"),
            **self.overrides,
        }
        text = (ROOT / "config.properties").read_text()
        for key, value in settings.items():
            line = f"{key}={value}".replace("\\", "\\\\")
            text, found = re.subn(rf"^{re.escape(key)}=.*$", line, text, flags=re.MULTILINE)
            if not found:
                text += f"\n{key}={value}\n"
        return text

    def start(self, timeout: float = 180) -> "TorchServeInstance":
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.properties").write_text(self.config_text())
        env = {**os.environ, **self.env, "TMPDIR": str(tmp), "TEMP": str(tmp),
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", "config.properties"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until a worker of the model is READY; raises with the log's tail if the server dies or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.worker_pids(quiet=True):
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def worker_pids(self, quiet: bool = False) -> list[int]:
        """Process ids of the model's READY workers, from the management API."""
        try:
            response = requests.get(self.url("management", f"/models/{MODEL_NAME}"), headers=self.auth("management"),
                                    timeout=5)
            workers = response.json()[0]["workers"] if response.status_code == 200 else []
        except (OSError, ValueError, KeyError, requests.RequestException):
            if quiet:
                return []
            raise
        return [int(w["pid"]) for w in workers if w.get("status") == "READY" and w.get("pid")]



def file_tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, or "" before it exists."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process_group(process: subprocess.Popen, grace: float = 15) -> None:
    """Stop the process group `process` leads (started with start_new_session): SIGTERM, `grace` seconds for
    all of it to go, then SIGKILL. TorchServe's launcher does not pass SIGTERM on to Java, hence the group."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(process, wait):
            break
    process.wait(timeout=10)


def _group_members(group: int, name: str) -> list[int]:
    """The pids of the running (not exited: zombies left out) processes named `name` in process group `group`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/PID/stat: "pid (comm) state ppid pgrp ...", comm in parentheses and possibly with spaces
            comm, fields = (entry / "stat").read_text().rsplit(")", 1)
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, _, pgrp = fields.split()[:3]
        if int(pgrp) == group and state != "Z" and comm.split("(", 1)[1] == name:
            members.append(int(entry.name))
    return members


def _group_gone(process: subprocess.Popen, timeout: float) -> bool:
    """Wait until no process of `process`'s group is left (the launcher, Java and the workers)."""
    def gone() -> bool:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        return False

    return _waited(process, gone, timeout)


def _waited(process: subprocess.Popen, done, timeout: float) -> bool:
    """Whether `done()` came to hold within `timeout` seconds, `process` reaped meanwhile (so that the launcher
    does not linger as a zombie)."""
    deadline = time.monotonic() + timeout
    while True:
        process.poll()
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
