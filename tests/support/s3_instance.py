"""A private S3-compatible server (moto's, `moto_server` from requirements.txt) on a free loopback port with one
bucket, for the tests and tests/support/fuzz_api.py: the jobs service keeps its images there as in a cluster it
keeps them in S3. Objects live in the server's memory; it is stopped by its pid: SIGTERM, then SIGKILL."""

import subprocess
import time
from pathlib import Path

import boto3
import requests

from torchserve_instance import VENV_BIN, ServerProcess, free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "style-jobs-test", "AWS_SECRET_ACCESS_KEY": "style-jobs-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Instance(ServerProcess):
    stop_grace = 5

    def __init__(self, workdir: Path, bucket: str = "style-jobs"):
        self.workdir, self.bucket = Path(workdir), bucket
        self.port = free_port()
        self.log_path = self.workdir / "moto_server.log"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client of this server needs: its credentials (any are taken) and region."""
        return dict(CREDENTIALS)

    def settings(self, prefix: str) -> dict[str, str]:
        """The jobs service's settings for objects under `prefix` of the bucket."""
        return {"object_store": f"s3://{self.bucket}/{prefix}", "s3_endpoint_url": self.endpoint_url}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object's key under `prefix`, with its size."""
        found = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def start(self, timeout: float = 30) -> "S3Instance":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(self.endpoint_url, timeout=2)
                break
            except requests.RequestException:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on port {self.port}:\n{self.log_tail()}")
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self
