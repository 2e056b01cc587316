#!/usr/bin/env python3
"""The playground: the page of web/ and the model's REST API behind one nginx (docs/playground.md).

    scripts/playground.sh [--listen 127.0.0.1:8090] [--inference http://127.0.0.1:8080]
                          [--management http://127.0.0.1:8081] [--key-file key_file.json]
                          [--inference-token-file FILE] [--ts-config config.properties] [--prefix DIR]
                          [--renew-before 300] [--wait 300]
                          [--jobs http://127.0.0.1:8070 | off] [--jobs-token-file jobs_token]
                          [--public --password-file FILE --host-name NAME ...]

Serves web/ on --listen with a real nginx configured from deploy/playground-nginx.conf, which passes
POST /predictions/style_transfer on to --inference with the inference key, and GET /description to the
management API's describe call (`/models/style_transfer?customized=true`) with the management key. The
defaults are scripts/serve.sh's server: its ports, its key_file.json in the repository root and its
config.properties, whose max_request_size nginx takes over; nginx's read timeout is TorchServe's
responseTimeout for the model, from its description, plus a margin.

The page runs each request as a job of the jobs service (docs/jobs.md), so that a closed tab loses nothing and
its Cancel button stops the work: nginx passes the jobs API (POST /jobs, GET /jobs/{id}, .../events,
.../result, POST .../cancel; deploy/playground-nginx-jobs.conf) on to --jobs with the token of
--jobs-token-file (scripts/serve.sh's ./jobs_token; it does not expire). The playground waits for the jobs
service as for TorchServe and refuses to start without it; with --jobs off (a server run with JOBS=off) the
page streams its request from TorchServe instead, and a closed tab loses that request's result.

TorchServe's inference and management keys expire after token_expiration_min (60 minutes unless set). While
it runs, this script reads the key file every few seconds, renews a key through TorchServe's token API (with
the key file's API key, which does not expire) once it has less than --renew-before seconds left, and
reloads nginx when the keys have changed: renewed here or elsewhere, or a restarted server. In front of a
cluster, --inference-token-file gives the token of the load balancer instead (that one is ours and does not
expire). Given without --key-file it is the only credential: the description is then asked of --inference
too, with that token (the Kubernetes pod's auth proxy serves the describe call there), and nothing is renewed.
Runs in the foreground until Ctrl-C or SIGTERM, then stops nginx by its pid.

It passes on only what its own page sends: nginx refuses a request whose Origin or Sec-Fetch-Site says it
comes from another site (403), and a request for a Host name that is not the playground's (421: DNS
rebinding). --listen takes a loopback address unless --public is given, and --public needs --password-file:
nginx then asks every visitor for that password (HTTP basic authentication, user "playground"), and
--host-name gives the names people use to reach it (the --listen host by default).
"""

import argparse
import ipaddress
import json
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import requests

from local_cluster import Nginx, NginxTemplate, find_nginx
from torchserve_instance import MODEL_NAME, ROOT

TEMPLATE = ROOT / "deploy" / "playground-nginx.conf"
JOBS_TEMPLATE = ROOT / "deploy" / "playground-nginx-jobs.conf"  # placed into TEMPLATE unless --jobs off
TORCHSERVE_MAX_REQUEST_SIZE = 6553500  # TorchServe's own default, where config.properties sets none
READ_TIMEOUT_MARGIN = 10  # s beyond responseTimeout: TorchServe gives up first, and says so
KEY_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]+")  # TorchServe's keys are base64url; nothing else reaches nginx.conf
HOST_NAME = re.compile(r"[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\]")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
PASSWORD_USER = "playground"
DEFAULT_MANAGEMENT = "http://127.0.0.1:8081"  # scripts/serve.sh's management API


@dataclass(frozen=True)
class Keys:
    inference: str
    management: str
    expiry: dict[str, datetime]  # of the keys from TorchServe's key file, by kind ("inference", "management")


def read_keys(key_file: Path | None, inference_token_file: Path | None) -> Keys:
    """The keys nginx adds; ValueError when the key file is not (yet, or not wholly) written. Without a key
    file, the token of `inference_token_file` serves both calls and nothing expires."""
    if key_file is None:
        token = read_token(inference_token_file)
        return Keys(token, token, {})
    entries = json.loads(key_file.read_text())
    expiry = {kind: datetime.fromisoformat(entries[kind]["expiration time"]) for kind in ("inference", "management")}
    inference = entries["inference"]["key"]
    if inference_token_file is not None:
        inference = inference_token_file.read_text().strip()
        del expiry["inference"]  # not TorchServe's: nothing here renews it
    for key in (inference, entries["management"]["key"]):
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError("a key with characters TorchServe does not use")
    return Keys(inference, entries["management"]["key"], expiry)


def describe(management_url: str, keys: Keys) -> dict:
    """TorchServe's description of the model (its own fields, not the handler's)."""
    response = requests.get(f"{management_url}/models/{MODEL_NAME}", timeout=10,
                            headers={"Authorization": f"Bearer {keys.management}"})
    response.raise_for_status()
    return response.json()[0]


def max_request_size(ts_config: Path) -> int:
    found = re.search(r"^max_request_size=(\d+)\s*$", ts_config.read_text(), flags=re.MULTILINE)
    return int(found.group(1)) if found else TORCHSERVE_MAX_REQUEST_SIZE


def wait_for_server(args) -> tuple[Keys, dict]:
    """The keys and the model's description, once the key file exists and the management API answers."""
    deadline, said = time.monotonic() + args.wait, False
    credentials = args.key_file or args.inference_token_file
    while True:
        try:
            keys = read_keys(args.key_file, args.inference_token_file)
            return keys, describe(args.management, keys)
        except (OSError, ValueError, KeyError, requests.RequestException) as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"playground: no TorchServe at {args.management} with the keys of {credentials} "
                                 f"after {args.wait:.0f} s ({error}); start one first: scripts/serve.sh")
            if not said:
                print(f"playground: waiting for TorchServe ({args.management}, {credentials})", file=sys.stderr)
                said = True
        time.sleep(1)


def read_token(path: Path) -> str:
    """The token a file holds (a load balancer's, the jobs service's); ValueError when it holds none, or one with
    characters that have no place in nginx.conf."""
    token = path.read_text().strip()
    if not KEY_PATTERN.fullmatch(token):
        raise ValueError(f"{path} holds no token (or one with characters a token does not have)")
    return token


def check_jobs(url: str, token: str) -> None:
    """The jobs service answers, and takes `token`: an unknown job is 404 to its clients, 401 to anyone else."""
    requests.get(f"{url}/ping", timeout=10).raise_for_status()
    answer = requests.get(f"{url}/jobs/playground-token-check", timeout=10,
                          headers={"Authorization": f"Bearer {token}"})
    if answer.status_code == 401:
        raise SystemExit(f"playground: the jobs service at {url} refuses the token of the jobs token file: give "
                         f"--jobs-token-file the file it reads (scripts/serve.sh: ./jobs_token)")
    if answer.status_code != 404:
        answer.raise_for_status()


def wait_for_jobs(args) -> str:
    """The jobs token, once its file exists and the jobs service answers and accepts it."""
    deadline = time.monotonic() + args.wait
    while True:
        try:
            token = read_token(args.jobs_token_file)
            check_jobs(args.jobs, token)
            return token
        except (OSError, ValueError, requests.RequestException) as error:
            if time.monotonic() > deadline:
                raise SystemExit(f"playground: no jobs service at {args.jobs} with the token of {args.jobs_token_file} "
                                 f"after {args.wait:.0f} s ({error}); start scripts/serve.sh with its jobs service "
                                 f"(not JOBS=off), or give --jobs off: the page then streams from TorchServe, and "
                                 f"a closed tab loses the result") from None
        time.sleep(1)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_names(args) -> list[str]:
    """The Host names the playground answers to: --host-name, else its --listen host (and on loopback the other
    loopback names, which a browser on this machine may use)."""
    host = args.listen.rsplit(":", 1)[0]
    names = list(args.host_name or [host])
    if is_loopback(host):
        names += [name for name in LOOPBACK_NAMES if name not in names]
    return names


def write_password_file(args) -> Path:
    """nginx's user file for basic authentication: the password of --password-file, hashed (SHA-512 crypt)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # the standard library's (Python 3.11, here); nginx checks it with the C library's crypt()
    password = args.password_file.read_text().strip()
    users = args.prefix / "htpasswd"
    users.touch(mode=0o600)
    users.write_text(f"{PASSWORD_USER}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_SHA512))}\n")
    return users


def render(args, keys: Keys, model: dict) -> str:
    port = args.listen.rsplit(":", 1)[1]
    names = host_names(args)
    basic_auth = "" if args.password_file is None else (
        f'        auth_basic "style-transfer playground";\n        auth_basic_user_file {args.prefix}/htpasswd;')
    jobs_routes = "" if args.jobs is None else NginxTemplate(JOBS_TEMPLATE.read_text()).substitute(
        jobs_url=args.jobs, jobs_token=args.jobs_token, max_request_size=max_request_size(args.ts_config))
    return NginxTemplate(TEMPLATE.read_text()).substitute(
        server_names=" ".join(names), basic_auth=basic_auth,
        jobs_routes=jobs_routes, jobs_enabled="false" if args.jobs is None else "true",
        own_origins="\n".join(f'        "http://{name}:{port}" 0;' for name in names),
        prefix=args.prefix, listen=args.listen, web_root=ROOT / "web", samples_root=ROOT / "samples",
        max_request_size=max_request_size(args.ts_config),
        read_timeout=int(model["responseTimeout"]) + READ_TIMEOUT_MARGIN,
        inference_url=args.inference, inference_key=keys.inference,
        management_url=args.management, management_key=keys.management)


def renew_expiring(args, keys: Keys) -> list[str]:
    """Renews, through TorchServe's token API, each key that expires within --renew-before seconds; TorchServe
    writes the new one into its key file. The kinds renewed."""
    if not keys.expiry:  # the token alone: nothing of TorchServe's to renew
        return []
    api_key = json.loads(args.key_file.read_text())["API"]["key"]
    soon = datetime.now(timezone.utc).timestamp() + args.renew_before
    renewed = []
    for kind, expiry in keys.expiry.items():
        if expiry.timestamp() < soon:
            response = requests.post(f"{args.management}/token", params={"type": kind}, timeout=10,
                                     headers={"Authorization": f"Bearer {api_key}"})
            response.raise_for_status()
            renewed.append(kind)
    return renewed


def keep_keys_fresh(args, nginx: Nginx, keys: Keys, model: dict, stop: threading.Event) -> None:
    """Until `stop`: renew what expires soon, and give nginx the key file's keys whenever they change."""
    interval = min(30.0, args.renew_before / 5)
    while not stop.wait(interval):
        if nginx.process.poll() is not None:
            raise SystemExit(f"playground: nginx exited with {nginx.process.returncode}:\n"
                             f"{nginx.log_tail('error.log')}")
        try:
            renewed = renew_expiring(args, keys)
            fresh = read_keys(args.key_file, args.inference_token_file)
        except (OSError, ValueError, KeyError, requests.RequestException) as error:
            print(f"playground: keys not renewed this time ({error}); trying again in {interval:.0f} s",
                  file=sys.stderr)
            continue
        if (fresh.inference, fresh.management) != (keys.inference, keys.management):
            nginx.reload(render(args, fresh, model))
            print(f"playground: new keys ({', '.join(renewed) or 'the key file changed'}): nginx reloaded",
                  file=sys.stderr)
        keys = fresh


def run(args) -> None:
    keys, model = wait_for_server(args)
    if args.jobs is not None:
        args.jobs_token = wait_for_jobs(args)
    host, port = args.listen.rsplit(":", 1)
    if args.password_file is not None:
        write_password_file(args)
    nginx = Nginx(args.prefix, render(args, keys, model), int(port), host=host)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        # Behind a password it answers 401 until one is given; on every address, 421 to an address it is not.
        nginx.start(ready_path="/", ready_statuses=(200, 401, 421) if args.public else (200,))
        print(f"playground: {nginx.url}/ (web/, with TorchServe at {args.inference}"
              f"{'' if args.jobs is None else f' and the jobs service at {args.jobs}'}); Ctrl-C stops it",
              file=sys.stderr)
        keep_keys_fresh(args, nginx, keys, model, stop)
    finally:
        nginx.stop()


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT nginx listens on (%(default)s)")
    parser.add_argument("--inference", default="http://127.0.0.1:8080",
                        help="TorchServe's inference API, or a load balancer in front of several (%(default)s)")
    parser.add_argument("--management",
                        help="TorchServe's management API, for the model's description (default: "
                             f"{DEFAULT_MANAGEMENT}; with the token alone, --inference)")
    parser.add_argument("--key-file", type=Path,
                        help="TorchServe's key_file.json, where the server writes it (default: the repository "
                             "root, scripts/serve.sh's working directory; none with --inference-token-file alone)")
    parser.add_argument("--inference-token-file", type=Path,
                        help="a file holding the token for --inference, instead of the key file's inference key "
                             "(a load balancer's client token); without --key-file, the only credential")
    parser.add_argument("--ts-config", type=Path, default=ROOT / "config.properties",
                        help="the server's config.properties, for max_request_size (default: scripts/serve.sh's)")
    parser.add_argument("--prefix", type=Path,
                        help="nginx's folder: configuration, pid file, logs (default: a temporary one, removed)")
    parser.add_argument("--renew-before", type=float, default=300,
                        help="renew a key that expires within this many seconds (%(default)s)")
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for TorchServe (%(default)s)")
    parser.add_argument("--public", action="store_true",
                        help="allow a --listen address that is not loopback (needs --password-file)")
    parser.add_argument("--password-file", type=Path,
                        help="a file holding the password nginx asks every visitor for (user 'playground')")
    parser.add_argument("--host-name", action="append",
                        help="a Host name people reach the playground by (repeatable; default: the --listen host)")
    parser.add_argument("--jobs", default="http://127.0.0.1:8070",
                        help="the jobs service the page runs its requests on, or 'off': the page then streams "
                             "them from --inference, and a closed tab loses the result (%(default)s)")
    parser.add_argument("--jobs-token-file", type=Path, default=ROOT / "jobs_token",
                        help="the jobs service's token file (default: the repository root's, which "
                             "scripts/serve.sh's jobs service writes)")
    args = parser.parse_args(argv)
    if args.key_file is None and args.inference_token_file is None:
        args.key_file = ROOT / "key_file.json"
    if args.management is None:
        args.management = DEFAULT_MANAGEMENT if args.key_file is not None else args.inference
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d+", args.listen):
        parser.error(f"--listen must be HOST:PORT; got {args.listen!r}")
    if not is_loopback(args.listen.rsplit(":", 1)[0]):
        if not args.public:
            parser.error(f"--listen {args.listen} is not loopback: anyone who reaches it uses the model with the "
                         f"server's credentials; give --public and --password-file to share it")
        if args.password_file is None:
            parser.error("--public needs --password-file: the playground then asks every visitor for it")
        if args.listen.rsplit(":", 1)[0] in ("0.0.0.0", "[::]") and not args.host_name:
            parser.error("--listen on every address needs --host-name: the names people reach it by")
    if not all(HOST_NAME.fullmatch(name) for name in args.host_name or []):
        parser.error("--host-name takes a host name or address, without port")
    if args.jobs == "off":
        args.jobs = None
    for option in ("inference", "management") + (() if args.jobs is None else ("jobs",)):
        url = getattr(args, option).rstrip("/")
        if not re.fullmatch(r"https?://[A-Za-z0-9.\[\]:-]+", url):
            parser.error(f"--{option} must be http(s)://HOST:PORT{' or off' * (option == 'jobs')}; got {url!r}")
        setattr(args, option, url)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    find_nginx()
    temporary = args.prefix is None
    if temporary:
        args.prefix = Path(tempfile.mkdtemp(prefix="playground-"))
    args.prefix = args.prefix.resolve()
    try:
        run(args)
    finally:
        if temporary:
            shutil.rmtree(args.prefix, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
