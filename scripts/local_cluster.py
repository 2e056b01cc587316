#!/usr/bin/env python3
"""A cluster on one machine: N TorchServe instances behind nginx, a bounded load, one instance killed mid-run.

    scripts/local_cluster.py [--instances 2] [--model-store model_store] [--requests 40] [--concurrency 4]
                             [--size 64] [--steps 5] [--kill-after 0.4] [--report FILE]
    scripts/local_cluster.py --overload --queue-size 1 [--occupy 3] [--requests 24] [--concurrency 8] ...
    scripts/local_cluster.py --overload --queue-size 8 --client-timeout 4 --occupy 6 [--instances 1] ...

Starts N private TorchServe instances (scripts/torchserve_instance.py) and a real nginx configured from
deploy/nginx.conf on free loopback ports, checks that nginx enforces the client token, runs scripts/load.py in
a second process and, once a `--kill-after` share of the requests has finished and every instance has
served some, SIGKILLs the last instance's whole process group (launcher, Java, workers). nginx must retry
what was in flight there on the other instances. Prints requests sent, succeeded and failed and the latency
percentiles, writes them as JSON with --report, and exits 1 when a request failed or the kill did not come
mid-run. Everything it started is stopped by process id; its temporary directory (configs, logs) is removed
unless the run failed.

With --overload nothing is killed: more requests come at once than the instances can queue (--queue-size sets
their job_queue_size). Every request must then get either its image (200) or, at once, 503 with Retry-After,
and no job may be computed twice: the images the instances answered (each one's access log: TorchServe 0.12's
frontend counters count requests as they arrive, and pings with them) must be the 200s the clients got.
--client-timeout sets how long nginx waits for an answer (proxy_read_timeout, and the X-Request-Timeout-Ms its
hops tell the handler). --occupy first keeps each instance's worker busy that long with a request sent straight
to it, as a client that waits longer would: the load's first requests then outwait their clients, who get
nginx's 504; the handler must drop each of them before any work (the instances' StyleRefusals{Reason="expired"}
must equal the 504s, and no image may be computed for them).

The archive comes from --model-store (scripts/build_mar.py writes model_store/style_transfer.mar); random
weights are fine for this test of the plumbing.
"""

import argparse
import json
import math
import os
import secrets
import select
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import re
import threading

import requests

from torchserve_instance import ROOT, TorchServeInstance, free_port

NGINX_TEMPLATE = ROOT / "deploy" / "nginx.conf"
LOAD_SCRIPT = ROOT / "scripts" / "load.py"
PREDICT_PATH = "/predictions/style_transfer"
WORKER_GOT_A_BATCH = "Backend received inference at:"  # TorchServe's worker logs this for every call of handle


class NginxTemplate(string.Template):
    delimiter = "@"  # nginx itself uses $


@dataclass(frozen=True)
class Hop:
    """One instance as nginx sees it: the loopback port of its hop, TorchServe's inference address and key, and
    its management address and key, for the model's description (none: the hop answers that call 404)."""
    name: str
    port: int
    address: str
    key: str
    management: str | None = None
    management_key: str | None = None


CLIENT_TIMEOUT = 310  # s a client waits through nginx: above TorchServe's responseTimeout (300 s, model-config.yaml)


def render_nginx_conf(prefix: Path, listen_port: int, client_token: str, hops: list[Hop],
                      client_timeout: int = CLIENT_TIMEOUT) -> str:
    def lines(fmt: str, only=lambda hop: True) -> str:
        return "\n".join("        " + fmt.format(hop=hop) for hop in hops if only(hop))

    return NginxTemplate(NGINX_TEMPLATE.read_text()).substitute(
        prefix=prefix, listen_port=listen_port, client_token=client_token, client_timeout=client_timeout,
        upstream_servers=lines("server 127.0.0.1:{hop.port} max_fails=1 fail_timeout=10s;"),
        instance_addresses=lines("{hop.port} {hop.address};"), instance_keys=lines("{hop.port} {hop.key};"),
        instance_names=lines("{hop.port} {hop.name};"), hop_listens=lines("listen 127.0.0.1:{hop.port};"),
        management_addresses=lines("{hop.port} {hop.management};", lambda hop: hop.management),
        management_keys=lines("{hop.port} {hop.management_key};", lambda hop: hop.management))


def find_nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise SystemExit("local_cluster: nginx is not installed (scripts/test.sh installs it: apt-get install nginx)")
    return found


class Nginx:
    """nginx in the foreground with its own prefix, config, pid file and logs; stopped by its pid."""

    def __init__(self, prefix: Path, conf_text: str, listen_port: int, host: str = "127.0.0.1"):
        self.prefix, self.listen_port, self.host = prefix, listen_port, host
        for folder in ("logs", "temp"):
            (prefix / folder).mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.touch(mode=0o600)  # it holds keys: the master, running as its owner, reads it
        self.conf.write_text(conf_text)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.listen_port}"

    def start(self, timeout: float = 20, ready_path: str = "/ping", ready_statuses=(200,)) -> "Nginx":
        """Starts nginx and waits until `ready_path` answers one of `ready_statuses`."""
        command = [find_nginx(), "-p", str(self.prefix), "-c", str(self.conf),
                   "-e", str(self.prefix / "logs/error.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log_tail('error.log')}")
            try:
                if requests.get(f"{self.url}{ready_path}", timeout=2).status_code in ready_statuses:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"nginx not serving {ready_path} after {timeout:.0f} s:\n{self.log_tail('error.log')}")

    def reload(self, conf_text: str) -> None:
        """A new configuration: the master starts new workers with it and lets the old ones finish what they
        serve (SIGHUP). A configuration nginx cannot load leaves the old one running and says so in error.log."""
        self.conf.write_text(conf_text)
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM to the master (it stops its workers), SIGKILL to the group if it does not stop in time."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.prefix / "logs" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def retried_requests(self) -> int:
        """Requests that needed more than one try (their upstream_status lists several: "502, 200")."""
        log = (self.prefix / "logs" / "access.log").read_text()
        return sum(1 for line in log.splitlines() if PREDICT_PATH in line and "," in line.rsplit('"', 2)[-2])


def start_instances(model_store: Path, root: Path, count: int,
                    overrides: dict[str, str] | None = None) -> list[TorchServeInstance]:
    """All instances started at once (each spends seconds in the JVM); none left running if one fails."""
    # The instances share this machine's cores. Left to themselves, each worker's OpenMP threads take every
    # core and the instances spin against each other (requests of 0.3 s took 12 s on 2 cores): give each
    # its share, as if it had a machine of its own.
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))
    instances = [TorchServeInstance(model_store, root / f"instance-{i + 1}", overrides,
                                    env={"OMP_NUM_THREADS": threads}) for i in range(count)]
    with ThreadPoolExecutor(max_workers=count) as pool:
        outcomes = list(pool.map(_start_quietly, instances))
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if failures:
        stop_all(instances)
        raise failures[0]
    return instances


def _start_quietly(instance: TorchServeInstance):
    try:
        return instance.start()
    except Exception as error:  # noqa: BLE001 - reported by start_instances after stopping the others
        return error


def stop_all(instances: list[TorchServeInstance]) -> None:
    with ThreadPoolExecutor(max_workers=max(len(instances), 1)) as pool:
        list(pool.map(lambda instance: instance.stop(), instances))


CLIENT_AUTH_HELD = {"ping_without_token": 200, "predict_without_token": 401, "predict_with_wrong_token": 401,
                    "describe_with_token": 200, "describe_without_token": 401, "rescale_with_token": 405,
                    "list_models_with_token": 404}


def check_client_auth(url: str, token: str) -> dict[str, int]:
    """What nginx answers without and with a wrong token (401 expected), and /ping without one (200); the model's
    description with the token (200) and without (401), and no other call of the management API (405, 404)."""
    files, auth = {"content": b"x", "style": b"x"}, {"Authorization": f"Bearer {token}"}
    describe = f"{url}/models/style_transfer?customized=true"
    return {
        "ping_without_token": requests.get(f"{url}/ping", timeout=10).status_code,
        "predict_without_token": requests.post(f"{url}{PREDICT_PATH}", files=files, timeout=10).status_code,
        "predict_with_wrong_token": requests.post(f"{url}{PREDICT_PATH}", files=files, timeout=10,
                                                  headers={"Authorization": f"Bearer {token}x"}).status_code,
        "describe_with_token": requests.get(describe, headers=auth, timeout=60).status_code,
        "describe_without_token": requests.get(describe, timeout=10).status_code,
        "rescale_with_token": requests.put(f"{url}/models/style_transfer", headers=auth, timeout=10).status_code,
        "list_models_with_token": requests.get(f"{url}/models", headers=auth, timeout=10).status_code,
    }


class KillSwitch:
    """Kills the victim's process group once `after` responses are in and every instance has served (never when
    `after` is None). Keeps what each response was: status, seconds and Retry-After."""

    def __init__(self, victim: TorchServeInstance, victim_name: str, names: list[str], after: int | None):
        self.victim, self.victim_name, self.names, self.after = victim, victim_name, names, after
        self.served = {"before_kill": Counter(), "after_kill": Counter()}
        self.responses: list[dict] = []
        self.killed_at_response: int | None = None

    def observe(self, result: dict) -> None:
        self.responses.append(result)
        self.served["after_kill" if self.fired else "before_kill"][result.get("served_by")] += 1
        if self.after is None or self.fired or len(self.responses) < self.after:
            return
        if all(self.served["before_kill"][n] for n in self.names):
            os.killpg(self.victim.process.pid, signal.SIGKILL)
            self.killed_at_response = len(self.responses)

    @property
    def fired(self) -> bool:
        return self.killed_at_response is not None


def run_load(url: str, token: str, args, kill_switch: KillSwitch, timeout: float) -> dict:
    """scripts/load.py in its own process; each response it reports goes to the kill switch. Its summary."""
    command = [sys.executable, str(LOAD_SCRIPT), "--url", url, "--requests", str(args.requests),
               "--concurrency", str(args.concurrency), "--size", str(args.size), "--steps", str(args.steps),
               "--timeout", str(args.request_timeout)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, "STYLE_TRANSFER_TOKEN": token})
    summary = None
    try:
        for record in _json_lines(process, time.monotonic() + timeout):
            if record["event"] == "response":
                kill_switch.observe(record)
            else:
                summary = record
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    if summary is None:
        raise RuntimeError(f"the load process ended without a summary (exit status {process.returncode})")
    return summary


def _json_lines(process: subprocess.Popen, deadline: float):
    """The JSON lines a process prints, as they come, until it closes its output; TimeoutError at `deadline`."""
    fd, pending = process.stdout.fileno(), b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the load did not finish in time")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        *complete, pending = (pending + chunk).split(b"\n")
        yield from (json.loads(line) for line in complete if line.strip())


def run_cluster(args) -> dict:
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="local-cluster-"))
    root.chmod(0o755)  # nginx's workers run as nobody when nginx is started by root
    instances, nginx, report = [], None, {"workdir": str(root)}
    try:
        overrides = {"job_queue_size": str(args.queue_size)} if args.queue_size else None
        instances = start_instances(args.model_store.resolve(), root, args.instances, overrides)
        names = [f"instance-{i + 1}" for i in range(len(instances))]
        hops = [Hop(name, free_port(), f"127.0.0.1:{ts.ports['inference']}", ts.key(),
                    f"127.0.0.1:{ts.ports['management']}", ts.key("management")) for name, ts in zip(names, instances)]
        token, listen_port = secrets.token_hex(32), free_port()
        nginx = Nginx(root / "nginx", render_nginx_conf(root / "nginx", listen_port, token, hops,
                                                        args.client_timeout), listen_port)
        nginx.start()  # after the assignment: a start that times out still leaves nginx for `finally` to stop
        report["auth"] = check_client_auth(nginx.url, token)
        kill_after = None if args.overload else math.ceil(args.kill_after * args.requests)
        kill_switch = KillSwitch(instances[-1], names[-1], names, kill_after)
        occupying = [occupy(ts, args.occupy) for ts in instances] if args.occupy else []
        load_started = time.monotonic()
        summary = run_load(nginx.url, token, args, kill_switch, args.load_timeout)
        for thread in occupying:
            thread.join(timeout=args.occupy + 60)
        report.update(_figures(summary, kill_switch, nginx, args))
        if args.overload:
            report["overload"] = _overload_figures(kill_switch.responses, instances, len(occupying))
        report["seconds"] = {"startup": round(load_started - started, 1),
                             "load": round(time.monotonic() - load_started, 1)}
        report["process_groups"] = [ts.process.pid for ts in instances] + [nginx.process.pid]
    finally:
        if nginx is not None:
            nginx.stop()
        stop_all(instances)
    report["seconds"] = {**report.get("seconds", {}), "total": round(time.monotonic() - started, 1)}
    return report


def _figures(summary: dict, kill_switch: KillSwitch, nginx: Nginx, args) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "instances": args.instances,
        "request": {"size": args.size, "steps": args.steps, "concurrency": args.concurrency},
        "requests": {key: summary[key] for key in ("sent", "succeeded", "failed")},
        "latency_seconds": {key: _round(value) for key, value in summary["latency_seconds"].items()},
        "killed": {"instance": kill_switch.victim_name, "after_responses": kill_switch.killed_at_response}
        if kill_switch.fired else None,
        "served_by": {phase: dict(counts) for phase, counts in kill_switch.served.items()},
        "retried_by_nginx": nginx.retried_requests(),
    }


def occupy(instance: TorchServeInstance, seconds: float) -> threading.Thread:
    """A request straight to `instance` (past nginx: no client wait declared) that keeps its worker busy for
    `seconds`; returned once the worker has it."""
    params = {"size": "32", "steps": "2000", "max_seconds": str(seconds)}
    files = {"content": (ROOT / "samples" / "tubingen.jpg").read_bytes(),
             "style": (ROOT / "samples" / "styles" / "starry_night.jpg").read_bytes()}
    before = _worker_batches(instance)
    thread = threading.Thread(target=requests.post, daemon=True, args=(instance.url("inference", PREDICT_PATH),),
                              kwargs={"headers": instance.auth(), "files": files, "data": params,
                                      "timeout": seconds + 60})
    thread.start()
    deadline = time.monotonic() + 30
    while _worker_batches(instance) == before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker of {instance.workdir.name} never got the occupying request")
        time.sleep(0.05)
    return thread


def _worker_batches(instance: TorchServeInstance) -> int:
    log = instance.workdir / "logs" / "model_log.log"
    return log.read_text(errors="replace").count(WORKER_GOT_A_BATCH) if log.exists() else 0


def _overload_figures(responses: list[dict], instances: list[TorchServeInstance], occupying: int) -> dict:
    """The statuses the clients got, how fast the 503s came and whether they said when to retry, the 2xx
    answers the instances themselves counted (a job computed twice, or for a client who had gone, would show
    here, not to the clients), and the requests they dropped because their clients had gone."""
    refused = [r for r in responses if r["status"] == 503]
    return {
        "statuses": dict(Counter(str(r["status"]) for r in responses)),
        "refused_max_seconds": _round(max((r["seconds"] for r in refused), default=None)),
        # one Retry-After of whole seconds (requests joins repeated headers with commas)
        "refused_without_retry_after": sum(1 for r in refused if not re.fullmatch(r"\d+", r.get("retry_after") or "")),
        "occupying_requests": occupying,
        "answered_by_instances": sum(_settled(lambda: _answered_predictions(ts)) for ts in instances),
        "expired_by_instances": sum(_settled(lambda: _expired_requests(ts)) for ts in instances),
    }


def _settled(count, settle: float = 1.0) -> int:
    """`count()` once it holds for `settle` seconds: log4j writes a line, and the frontend takes the worker's
    metrics from its output, a moment after the answer."""
    previous = None
    while (current := count()) != previous:
        previous = current
        time.sleep(settle)
    return current


def _answered_predictions(instance: TorchServeInstance) -> int:
    """Predictions an instance answered with 200, from its access log."""
    log = instance.workdir / "logs" / "access_log.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return sum(1 for line in lines if f'"POST {PREDICT_PATH} HTTP/1.1" 200 ' in line)


def _expired_requests(instance: TorchServeInstance) -> int:
    """The handler's StyleRefusals{Reason="expired"} on the instance's metrics port."""
    metrics = requests.get(instance.url("metrics", "/metrics"), timeout=10).text
    return round(sum(float(value) for value in
                     re.findall(r'^StyleRefusals\{[^}]*Reason="expired"[^}]*\} (\S+)$', metrics, re.MULTILINE)))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def succeeded(report: dict, overload: bool = False) -> bool:
    auth_ok = report.get("auth") == CLIENT_AUTH_HELD
    if overload:
        return auth_ok and overload_held(report.get("overload", {}))
    requests_ok = report.get("requests", {}).get("failed") == 0
    return auth_ok and requests_ok and report.get("killed") is not None


OVERLOAD_REFUSAL_SECONDS = 5  # a full queue answers at once: well under any job's time


def overload_held(figures: dict) -> bool:
    """Every request got its image, a fast 503 with Retry-After, or, having waited as long as its client waits,
    nginx's 504 while the instance dropped it before any work; some were refused or dropped; and every image
    the instances computed went to a client, once."""
    statuses = figures.get("statuses", {})
    refused = statuses.get("503", 0)
    return ("200" in statuses and set(statuses) <= {"200", "503", "504"} and len(statuses) > 1
            and figures["refused_without_retry_after"] == 0
            and (not refused or figures["refused_max_seconds"] <= OVERLOAD_REFUSAL_SECONDS)
            and figures["answered_by_instances"] == statuses["200"] + figures["occupying_requests"]
            and figures["expired_by_instances"] == statuses.get("504", 0))


def print_report(report: dict) -> None:
    counts, latency, killed = report["requests"], report["latency_seconds"], report["killed"] or {}
    print(f"local_cluster: {report['instances']} instances behind nginx; killed {killed.get('instance', 'none')} "
          f"after {killed.get('after_responses', '-')} responses")
    print(f"local_cluster: requests sent {counts['sent']}, succeeded {counts['succeeded']}, failed {counts['failed']}, "
          f"retried by nginx {report['retried_by_nginx']}")
    print(f"local_cluster: latency p50 {latency['p50']} s, p90 {latency['p90']} s, p99 {latency['p99']} s")
    print(json.dumps(report))


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--model-store", type=Path, default=ROOT / "model_store",
                        help="a folder with style_transfer.mar (scripts/build_mar.py)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="longer side of each output, px")
    parser.add_argument("--steps", type=int, default=5, help="optimiser iterations per request")
    parser.add_argument("--kill-after", type=float, default=0.4,
                        help="share of the requests that finish before the last instance is killed")
    parser.add_argument("--request-timeout", type=float, default=330, help="seconds, per request")
    parser.add_argument("--load-timeout", type=float, default=600, help="seconds, for the whole load")
    parser.add_argument("--report", type=Path, help="write the figures here as JSON")
    parser.add_argument("--overload", action="store_true",
                        help="kill nothing; check that an overload is refused fast and computes nothing twice")
    parser.add_argument("--queue-size", type=int, help="the instances' job_queue_size (config.properties')")
    parser.add_argument("--client-timeout", type=int, default=CLIENT_TIMEOUT,
                        help="seconds nginx waits for an answer, as it tells the handler")
    parser.add_argument("--occupy", type=float, default=0,
                        help="with --overload: seconds each worker is kept busy by a request sent past nginx first")
    args = parser.parse_args(argv)
    if args.instances < 2 and not args.overload:
        parser.error("--instances must be at least 2: one is killed")
    if not (args.model_store / "style_transfer.mar").is_file():
        parser.error(f"no style_transfer.mar in {args.model_store}: run scripts/build_mar.py first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_cluster(args)
    print_report(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if succeeded(report, args.overload):
        shutil.rmtree(report["workdir"], ignore_errors=True)
        return 0
    print(f"local_cluster: FAILED; configs and logs kept in {report['workdir']}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
