"""The jobs service's settings: environment variables STYLE_JOBS_*, the one place they are set (scripts/serve.sh
and deploy/k8s/jobs.yaml set them). The worker's handler reads STYLE_JOBS_REDIS_URL too, to see cancellations."""

import os
from dataclasses import dataclass, fields
from pathlib import Path

PREFIX = "STYLE_JOBS_"


@dataclass(frozen=True)
class JobsConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"  # the store: jobs, requests, results, events, the queue
    listen: str = "127.0.0.1:8070"  # host:port of the HTTP API
    torchserve_url: str = "http://127.0.0.1:8080"  # TorchServe's inference API (or a proxy in front of it)
    # TorchServe's management API: its describe call gives the limits submits are checked against (jobs/checks.py),
    # and its token API renews the keys of torchserve_key_file before they expire. In a cluster, the auth proxy,
    # which serves the describe call (deploy/k8s/jobs/jobs.yaml).
    torchserve_management_url: str = "http://127.0.0.1:8081"
    # How the service authenticates to TorchServe: the inference key of TorchServe's key_file.json (read again
    # whenever the file changes, renewed through the management API with the file's API key), or, when
    # torchserve_token_file is set, the token in that file (a cluster's auth proxy token, which does not expire).
    torchserve_key_file: str = "key_file.json"
    torchserve_token_file: str = ""
    renew_key_before_seconds: float = 300
    # The clients' token: read from this file; when it does not exist the service writes a new random one (mode
    # 0600) at start, as TorchServe writes key_file.json. Several replicas must share the file (a Secret).
    token_file: str = "jobs_token"
    retention_seconds: int = 86400  # a finished job, its result and events are deleted this long after it ends
    concurrency: int = 8  # requests one replica keeps in flight to TorchServe (batching needs several)
    # Runs of a job that may break off in TorchServe (its worker died, the stream was cut): 2 = one retry. Runs
    # this service cuts short itself (a replica stopping, a lapsed lease) do not count.
    max_attempts: int = 2
    # The most a job may take from its first run on, waiting for TorchServe and runs that were cut short
    # included; then it fails with 504 Timeout.
    job_timeout_seconds: int = 3600
    max_request_bytes: int = 67_108_864  # the largest submitted body, as TorchServe's max_request_size
    # Webhook destinations, comma-separated: host names ("hooks.example.com", "*.example.com") and address ranges
    # ("203.0.113.0/24", "127.0.0.1/32"). A webhook URL must match an entry, and every address its host
    # resolves to must be public unless a range entry allows it (loopback and private ranges need an explicit
    # range). Empty: webhooks are refused.
    webhook_allow: str = ""
    webhook_timeout_seconds: float = 10
    # A run holds its job with a lease in the store, renewed every third of this: a run that has not renewed it
    # for this long (its replica stopped, stalled or lost the store) is taken for dead and its job runs again.
    lease_seconds: float = 15
    # The socket timeout of every call to the store: while it cannot be reached, API calls answer 503 within this.
    redis_timeout_seconds: float = 5
    # The most a replica takes from SIGTERM to its exit (its running jobs given back); keep it well within the
    # deployment's terminationGracePeriodSeconds (30).
    shutdown_seconds: float = 10

    @classmethod
    def from_environment(cls, environ: dict | None = None) -> "JobsConfig":
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(PREFIX + field.name.upper())
            if raw is not None:
                values[field.name] = field.type(raw)
        config = cls(**values)
        if config.max_attempts < 1 or config.concurrency < 1 or config.retention_seconds < 1:
            raise ValueError(f"{PREFIX}MAX_ATTEMPTS, CONCURRENCY and RETENTION_SECONDS must be at least 1")
        if min(config.lease_seconds, config.redis_timeout_seconds, config.shutdown_seconds) <= 0:
            raise ValueError(f"{PREFIX}LEASE_SECONDS, REDIS_TIMEOUT_SECONDS and SHUTDOWN_SECONDS must be positive")
        return config

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def webhook_allowlist(self) -> list[str]:
        return [entry.strip() for entry in self.webhook_allow.split(",") if entry.strip()]

    def path(self, name: str) -> Path:
        return Path(getattr(self, name)).expanduser()
