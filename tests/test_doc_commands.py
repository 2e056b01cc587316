"""Every command the README and the docs show runs, as a reader would run it, against real servers.

Each page's `bash` blocks run in order in one shell, in a folder laid out like the repository (samples/,
scripts/, .venv/ …, with the servers' key_file.json, jobs_token and run/jobs/webhook_secret), so that a block
may use what an earlier one set ($TOKEN, $JOB). A `python` block is a file named on its first line
(`# grpc_predict.py`), written there for a later block to run. What the suite changes, and why: the servers'
addresses (free ports, never the fixed ones), sizes and steps made tiny (2 CPU cores), and `imagenet` weights
made `random` (no download here). curl fails on an error status. A block the suite cannot run says why in a
comment just above it: `<!-- not run by the suite: REASON -->`.
"""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest
import yaml

from conftest import ROOT
from torchserve_instance import free_port

DOCUMENTS = ["README.md", "CHANGELOG.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!-- not run by the suite: (.+) -->")
LANGUAGES = {"bash", "python", "text", "json"}  # bash and python run; text and json are output
# The repository as a reader has it, linked into each page's folder.
LAYOUT = ("samples", "scripts", "handler", "jobs", "proto", "deploy", "benchmarks", ".venv", "config.properties")
PRELUDE = """set -euo pipefail
curl() { command curl --fail-with-body --silent --show-error "$@"; }
"""
TINY = {"size": 64, "steps": 3}
# The servers' archive: tiny defaults, so that a request with none is cheap, and maxima just above TINY, so that a
# size the rewrite missed is refused (400) instead of taking minutes; time enough for a loaded machine.
_HANDLER = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
DOC_SETTINGS = {"responseTimeout": 60, "maxBatchDelay": 1,
                "handler": {**_HANDLER, "device_overrides": {}, "reply_margin_seconds": 10,
                            "defaults": {**TINY, "max_seconds": 50},
                            "maxima": {"size": 96, "steps": 10, "max_seconds": 50}}}


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    code: str
    not_run: str | None  # why the suite does not run it

    @property
    def runs(self) -> bool:
        return self.language in ("bash", "python") and self.not_run is None

    @property
    def file_name(self) -> str | None:
        """A python block's file, named on its first line."""
        match = re.match(r"# ([\w-]+\.py)\b", self.code)
        return match.group(1) if match else None


def blocks(document: str) -> list[Block]:
    text = (ROOT / document).read_text()
    found = []
    for fence in FENCE.finditer(text):
        line_before = text[:fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        reason = NOT_RUN.fullmatch(line_before.strip())
        found.append(Block(document, text.count("\n", 0, fence.start()) + 1, fence.group(1), fence.group(2),
                           reason.group(1) if reason else None))
    return found


RUN_DOCUMENTS = [document for document in DOCUMENTS if any(block.runs for block in blocks(document))]


def test_every_block_says_what_it_is_and_every_command_runs_or_says_why_not():
    for document in DOCUMENTS:
        page = blocks(document)
        bash = "\n".join(block.code for block in page if block.language == "bash" and block.runs)
        for block in page:
            where = f"{document}:{block.line}"
            assert block.language in LANGUAGES, f"{where}: a code block needs one of {sorted(LANGUAGES)}"
            if block.language == "python" and block.runs:
                assert block.file_name, f"{where}: a python sample names its file on its first line"
                assert f"python {block.file_name}" in bash, f"{where}: no command of the page runs it"
            if block.not_run is not None:
                assert block.language == "bash" and len(block.not_run.split()) >= 3, f"{where}: say why"
        marks = re.findall(r"<!-- not run.*?-->", re.sub(r"`[^`\n]*`", "", (ROOT / document).read_text()))
        assert len(marks) == sum(block.not_run is not None for block in page), f"{document}: {marks}"
    assert len(RUN_DOCUMENTS) >= 6 and {"README.md", "docs/quickstart.md", "docs/api.md"} <= set(RUN_DOCUMENTS)


def as_run_here(code: str, addresses: dict[str, str]) -> str:
    """The block with the test servers' addresses, tiny sizes and steps, and random weights."""
    for address, here in addresses.items():
        code = code.replace(address, here)
    for name, value in TINY.items():
        code = re.sub(rf'(?<![\w-])(--{name} |{name}=|"{name}": )\d+', rf"\g<1>{value}", code)
    return re.sub(r"\bimagenet\b", "random", code)


def page_script(document: str, addresses: dict[str, str]) -> str:
    lines = [PRELUDE]
    for block in blocks(document):
        if block.runs and block.language == "bash":
            lines += [f'echo "### {document}:{block.line} (at $SECONDS s)" >&2', as_run_here(block.code, addresses)]
    return "\n".join(lines)


WEBHOOK_RECEIVER = "127.0.0.1:8090"  # where docs/jobs.md's receiver listens, which the jobs service may call


@pytest.fixture(scope="module")
def receiver_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def servers(redis_server, receiver_port, tmp_path_factory):
    """TorchServe with a random-weights archive of DOC_SETTINGS and a jobs service in front of it, its worker
    reading the jobs' cancellations from Redis, as scripts/serve.sh runs them; webhooks allowed to the page's
    receiver."""
    from build_mar import build
    from jobs_instance import JobsInstance
    from torchserve_instance import TorchServeInstance

    workdir = tmp_path_factory.mktemp("doc_servers")
    build("random", workdir / "store", settings=DOC_SETTINGS)
    with TorchServeInstance(workdir / "store", workdir / "torchserve",
                            env={"STYLE_JOBS_REDIS_URL": redis_server.url}) as torchserve, \
            JobsInstance(workdir / "jobs", redis_server.url, torchserve,
                         webhook_allow=f"127.0.0.1/32:{receiver_port}") as jobs:
        yield torchserve, jobs


@pytest.mark.integration
@pytest.mark.parametrize("document", RUN_DOCUMENTS)
def test_the_commands_of_a_page_run(document, servers, receiver_port, tmp_path):
    torchserve, jobs = servers
    for name in LAYOUT:
        (tmp_path / name).symlink_to(ROOT / name)
    shutil.copy(torchserve.workdir / "key_file.json", tmp_path / "key_file.json")
    shutil.copy(jobs.workdir / "jobs_token", tmp_path / "jobs_token")
    (tmp_path / "run" / "jobs").mkdir(parents=True)  # where serve.sh's jobs service keeps its webhook secret
    shutil.copy(jobs.workdir / "webhook_secret", tmp_path / "run" / "jobs" / "webhook_secret")
    addresses = {"127.0.0.1:8080": torchserve.url("inference").removeprefix("http://"),
                 "127.0.0.1:8081": torchserve.url("management").removeprefix("http://"),
                 "127.0.0.1:7070": torchserve.grpc_target, "127.0.0.1:8070": jobs.url().removeprefix("http://"),
                 "127.0.0.1:9070": jobs.metrics_url().removeprefix("http://").removesuffix("/metrics"),
                 WEBHOOK_RECEIVER: f"127.0.0.1:{receiver_port}"}
    for block in blocks(document):
        if block.runs and block.language == "python":
            (tmp_path / block.file_name).write_text(as_run_here(block.code, addresses))
    script = page_script(document, addresses)
    assert not re.search(r"127\.0\.0\.1:(8080|8081|7070|8070|8090|9070)\b", script), "a fixed address is left"
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, f"{document}: the block after the last ### failed\n{run.stderr[-3000:]}"
    for image in tmp_path.glob("*.png"):
        assert image.read_bytes().startswith(b"\x89PNG"), f"{document} wrote {image.name}, not an image"


def test_the_suite_changes_only_addresses_sizes_steps_and_weights():
    code = ('curl -F size=512 -F steps=300 http://127.0.0.1:8080/x; stylize.py --size 256 --steps 60 '
            '--weights imagenet; json.dumps({"size": 256, "steps": 100}); -F min_scale=128 -F style_scale=2')
    assert as_run_here(code, {"127.0.0.1:8080": "127.0.0.1:12345"}) == (
        'curl -F size=64 -F steps=3 http://127.0.0.1:12345/x; stylize.py --size 64 --steps 3 '
        '--weights random; json.dumps({"size": 64, "steps": 3}); -F min_scale=128 -F style_scale=2')
