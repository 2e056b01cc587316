"""A private redis-server (Debian's package) on a free loopback port, for tests and tests/support/fuzz_api.py.

It listens on 127.0.0.1 only, requires a password (given, or a new random one), keeps its files in its own
directory (append-only file there, so that a restarted Redis keeps the jobs), holds at most 512 MB and evicts
nothing (as the jobs' Redis must: scripts/serve.sh's, deploy/k8s/jobs/redis.yaml), and is stopped by its pid:
SIGTERM, then SIGKILL. Nothing else on the machine is touched.
"""

import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from torchserve_instance import ServerProcess, free_port

REDIS_SERVER = "redis-server"


def find_redis_server() -> str:
    found = shutil.which(REDIS_SERVER) or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if found is None:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server (scripts/test.sh does)")
    return found


class RedisInstance(ServerProcess):
    stop_grace = 10

    def __init__(self, workdir: Path, port: int | None = None, password: str | None = None):
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self.log_path = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def config_text(self) -> str:
        return "\n".join([
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f"requirepass {self.password}",
            f"dir {self.workdir}", "appendonly yes", "appendfsync everysec", 'save ""', "daemonize no",
            "maxmemory 512mb", "maxmemory-policy noeviction",
            f"logfile {self.log_path}", "databases 1",
        ]) + "\n"

    def start(self, timeout: float = 20) -> "RedisInstance":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "redis.conf"
        config.write_text(self.config_text())
        config.chmod(0o600)  # it holds the password
        self.process = subprocess.Popen([find_redis_server(), str(config)], cwd=self.workdir,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}; see {self.log_path}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        import redis

        try:
            return redis.Redis.from_url(self.url, socket_timeout=1).ping()
        except redis.RedisError:
            return False
