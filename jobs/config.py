"""The jobs service's settings: environment variables STYLE_JOBS_*, the one place they are set (scripts/serve.sh
and deploy/k8s/jobs/jobs.yaml set them). The worker's handler reads STYLE_JOBS_REDIS_URL too, to see cancellations."""

import os
from dataclasses import dataclass, fields
from pathlib import Path

PREFIX = "STYLE_JOBS_"


@dataclass(frozen=True)
class JobsConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"  # the store: the jobs' records, events and counters, the queue
    # Where the jobs' images (requests and results) are kept: a bucket, s3://BUCKET or s3://BUCKET/PREFIX (its
    # credentials from the usual AWS chain: AWS_* variables, shared files, the pod's role), or a local directory
    # for one machine (scripts/serve.sh: run/jobs/objects). A job's objects go when it expires.
    object_store: str = "jobs_objects"
    s3_endpoint_url: str = ""  # an S3-compatible service that is not AWS (MinIO, Ceph, ...): its URL
    s3_region: str = ""  # the bucket's region, where the credential chain does not give it
    listen: str = "127.0.0.1:8070"  # host:port of the HTTP API
    # host:port of GET /metrics, apart from the API: reach it from the monitoring network only (in a cluster a
    # NetworkPolicy does), or set metrics_token_file as well. Empty: no metrics.
    metrics_listen: str = "127.0.0.1:9070"
    metrics_token_file: str = ""  # when set, /metrics needs Authorization: Bearer <the token in this file>
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
    # The clients and their tokens: `name token` lines, or one token alone (the client `default`), read again
    # when the file changes. When it does not exist the service writes one random token there (mode 0600) at
    # start, as TorchServe writes key_file.json. Several replicas must share the file (a Secret).
    token_file: str = "jobs_token"
    retention_seconds: int = 86400  # a finished job, its result and events are deleted this long after it ends
    # Quotas, answered 429 with Retry-After: a client's jobs not yet ended, the bytes of a client's requests and
    # results kept in the object store, and the jobs not yet ended of all clients together.
    client_max_unfinished: int = 100
    client_max_stored_bytes: int = 10_737_418_240
    max_unfinished: int = 10_000
    concurrency: int = 8  # requests one replica keeps in flight to TorchServe (batching needs several)
    # Runs of a job that may break off in TorchServe (its worker died, the stream was cut): 2 = one retry. Runs
    # this service cuts short itself (a replica stopping, a lapsed lease) do not count.
    max_attempts: int = 2
    # The most a job may take from its first run on, waiting for TorchServe and runs that were cut short
    # included; then it fails with 504 Timeout.
    job_timeout_seconds: int = 3600
    # A job runs as segments of at most this much optimisation each (TorchServe's worker caps it at its own
    # most per request): each ends with a checkpoint, the job goes back to the end of the queue, and the next
    # segment goes on from there, so that other jobs and direct requests get the worker in between and a worker
    # that dies loses at most one segment. Each segment repeats the style targets' work.
    segment_seconds: float = 60
    max_request_bytes: int = 67_108_864  # the largest submitted body, as TorchServe's max_request_size
    # The memory a replica's submits hold at once while they are read: a multipart submit holds about 28 MiB
    # (a part of its upload as it comes, joined and as it is sent, and the fields the checks read), a JSON one
    # twice its size. Past it, submits wait for their turn (503 Busy after 30 s).
    upload_memory_bytes: int = 134_217_728
    # Webhook destinations, comma-separated: host names ("hooks.example.com", "*.example.com") and address ranges
    # ("203.0.113.0/24", "127.0.0.1/32"), each optionally with a port ("hooks.example.com:8443"). A webhook URL
    # must match an entry, its port must be 80 or 443 unless that entry names it, and every address its host
    # resolves to must be public unless a range entry allows it (loopback and private ranges need an explicit
    # range). Empty: webhooks are refused.
    webhook_allow: str = ""
    # The secrets webhooks are signed with (Standard Webhooks): whsec_<base64> lines, the first the newest (each
    # signs). When the file does not exist the service writes one (mode 0600) at start. Replicas share it.
    webhook_secret_file: str = "jobs_webhook_secret"
    webhook_timeout_seconds: float = 10  # one try of a delivery
    # A failed try is made again after webhook_first_retry_seconds, doubling (at most an hour, jittered), until
    # webhook_retry_seconds have passed since the event; across restarts of the service.
    webhook_first_retry_seconds: float = 5
    webhook_retry_seconds: float = 86400
    webhook_concurrency_per_endpoint: int = 4  # tries one replica has in flight to one scheme://host:port
    # Event streams: at most this many open at once per client on one replica (429 past it); each ends after
    # event_stream_seconds (the client reconnects with Last-Event-ID, its `retry:` field says when), or when a
    # write to its client does not go through within stream_write_timeout_seconds.
    max_streams_per_client: int = 100
    event_stream_seconds: float = 300
    stream_write_timeout_seconds: float = 10
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
        at_least_one = ("max_attempts", "concurrency", "retention_seconds", "client_max_unfinished",
                        "max_unfinished", "max_streams_per_client", "webhook_concurrency_per_endpoint")
        positive = ("lease_seconds", "segment_seconds", "redis_timeout_seconds", "shutdown_seconds",
                    "webhook_timeout_seconds",
                    "webhook_first_retry_seconds", "webhook_retry_seconds", "event_stream_seconds",
                    "stream_write_timeout_seconds", "upload_memory_bytes", "client_max_stored_bytes")
        for names, fails, what in ((at_least_one, lambda value: value < 1, "at least 1"),
                                   (positive, lambda value: value <= 0, "positive")):
            wrong = [PREFIX + name.upper() for name in names if fails(getattr(config, name))]
            if wrong:
                raise ValueError(f"{', '.join(wrong)} must be {what}")
        return config

    @property
    def host_port(self) -> tuple[str, int]:
        return _host_port(self.listen)

    @property
    def metrics_host_port(self) -> tuple[str, int] | None:
        return _host_port(self.metrics_listen) if self.metrics_listen else None

    @property
    def webhook_allowlist(self) -> list[str]:
        return [entry.strip() for entry in self.webhook_allow.split(",") if entry.strip()]

    def path(self, name: str) -> Path:
        return Path(getattr(self, name)).expanduser()


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)
