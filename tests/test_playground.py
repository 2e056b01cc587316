"""The playground (web/, scripts/playground.sh) in a real headless Chromium, behind the real nginx of
playground.sh, in front of a real jobs service (on the session's Redis) and a real TorchServe with a
random-weights archive whose keys expire every 15 s, so that the playground renews them while the tests run;
and once, with --jobs off, in front of a load balancer, the front of deploy/nginx.conf before the session's
shared server. Small images and few steps: these test the page and its plumbing, not the method. Screenshots
of the finished page are kept in pytest's temporary folder (playground_screenshots0/ under --basetemp)."""

import contextlib
import http.server
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ROOT, SAMPLES
from jobs_instance import JobsInstance
from local_cluster import Hop, Nginx, render_nginx_conf
from torchserve_instance import TorchServeInstance, free_port

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/test.sh installs it); no browser is downloaded
# As root Chromium needs --no-sandbox; the rest keep it from calling out of this machine's closed network.
CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY_LIFETIME_MINUTES = 0.25
RENEW_BEFORE_SECONDS = 10
CONTENT = SAMPLES / "tubingen.jpg"
STYLE = SAMPLES / "styles" / "starry_night.jpg"
PREDICT_PATH = "/predictions/style_transfer"
SOME_ID = "0123456789abcdef" * 2  # the shape of the ids the jobs service makes; no job has it
JOB_PATHS = ("/jobs/{id}", "/jobs/{id}/events", "/jobs/{id}/result")  # and POST /jobs, POST /jobs/{id}/cancel
REMEMBERED_JOB = "playground.job"  # web/js/main.js's localStorage key
WAIT_MS = 60_000  # for anything the page waits for from the server: a bound, not an expectation
PHONE_WIDTH = 360  # px: a small phone's screen
STREAMED_SECONDS = 8  # max_seconds of the streaming check: a dozen progress lines, 0.5 s apart at the least


class Playground:
    """scripts/playground.sh in front of `torchserve` and `jobs` (None: --jobs off), or with `inference` and
    `token_file` in front of a load balancer of several (docs/playground.md); the description from
    `torchserve`'s management API."""

    def __init__(self, torchserve: TorchServeInstance, prefix: Path, jobs: JobsInstance | None,
                 inference: str | None = None, token_file: Path | None = None):
        self.torchserve, self.prefix, self.port, self.jobs = torchserve, prefix, free_port(), jobs
        self.inference, self.token_file = inference or torchserve.url("inference"), token_file
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = prefix.parent / "playground.log"
        self.first_keys = json.loads(self.key_file.read_text())
        self.process: subprocess.Popen | None = None
        self.nginx_pid: int | None = None

    @property
    def key_file(self) -> Path:
        return self.torchserve.workdir / "key_file.json"

    def start(self, timeout: float = 60) -> "Playground":
        command = [str(ROOT / "scripts" / "playground.sh"), "--listen", f"127.0.0.1:{self.port}",
                   "--inference", self.inference, "--management", self.torchserve.url("management"),
                   "--key-file", str(self.key_file), "--prefix", str(self.prefix),
                   "--renew-before", str(RENEW_BEFORE_SECONDS), "--wait", "30"]
        if self.token_file is not None:
            command += ["--inference-token-file", str(self.token_file)]
        command += ["--jobs", "off"] if self.jobs is None else [
            "--jobs", self.jobs.url(), "--jobs-token-file", str(self.jobs.workdir / "jobs_token")]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"playground.sh exited with {self.process.returncode}:\n{self.log()}")
            if self.answers():
                self.nginx_pid = int((self.prefix / "nginx.pid").read_text())
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the playground did not serve its page within {timeout:.0f} s:\n{self.log()}")

    def answers(self) -> bool:
        try:
            return requests.get(self.url + "/", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """SIGTERM to playground.sh's process (it stops its nginx), SIGKILL to its group if it lingers."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def torchserve(model_store, tmp_path_factory, redis_server):
    """Its worker reads the jobs service's cancellations from the session's Redis, as scripts/serve.sh sets up."""
    instance = TorchServeInstance(model_store, tmp_path_factory.mktemp("playground_torchserve"),
                                  overrides={"token_expiration_min": str(KEY_LIFETIME_MINUTES)},
                                  env={"STYLE_JOBS_REDIS_URL": redis_server.url})
    with instance:
        yield instance


@pytest.fixture(scope="module")
def jobs(torchserve, redis_server, tmp_path_factory):
    """The jobs service in front of `torchserve`. It renews TorchServe's key only once the key has expired: the
    playground renews it before, and two renewers would each invalidate the key the other just read."""
    with JobsInstance(tmp_path_factory.mktemp("playground_jobs"), redis_server.url, torchserve,
                      renew_key_before_seconds=0, retention_seconds=600) as instance:
        yield instance


@pytest.fixture(scope="module")
def playground(torchserve, jobs, tmp_path_factory):
    served = Playground(torchserve, tmp_path_factory.mktemp("playground") / "nginx", jobs).start()
    yield served
    served.stop()
    with pytest.raises(ProcessLookupError):  # no nginx left behind
        os.kill(served.nginx_pid, 0)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):  # a failure, not a skip: scripts/test.sh installs it
        pytest.fail(f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium")
    with playwright_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium_profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """Where the finished page's screenshot is kept (docs/playground.md)."""
    return tmp_path_factory.mktemp("playground_screenshots")


class Watched:
    """A page with what it logged, the errors it raised and every request it made."""

    def __init__(self, page):
        self.page, self.console_errors, self.page_errors, self.requests = page, [], [], []
        page.on("console", lambda message: message.type == "error" and self.console_errors.append(message.text))
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("request", lambda request: self.requests.append(request.url))

    def errors(self, refusals: int = 0) -> list[str]:
        """The page's errors and what it logged as errors, but for the `refusals` expected 400 answers, which
        Chromium itself logs ("Failed to load resource: ... 400"), and for requests that came in the moment
        the playground renewed a key, which the page sends again (web/js/api.js)."""
        refused = [text for text in self.console_errors if "responded with a status of 400" in text]
        renewal = [text for text in refused if text.endswith("(Bad Request)")]  # TorchServe's InvalidKeyException
        assert len(refused) - len(renewal) == refusals, self.console_errors
        return [text for text in self.console_errors if text not in refused] + self.page_errors


@pytest.fixture
def page(browser, playground):
    """A new tab of the playground with no job remembered from another test's (the tests share one profile)."""
    opened = browser.new_page()
    opened.add_init_script(f"localStorage.removeItem('{REMEMBERED_JOB}')")
    watched = Watched(opened)
    opened.goto(playground.url + "/")
    opened.locator("#preset-list li").nth(2).wait_for(timeout=WAIT_MS)  # the description has come
    yield watched
    opened.close()


def test_the_page_loads_from_the_playground_alone_with_no_console_error(page, playground):
    tab = page.page
    assert tab.locator("#preset-list input").evaluate_all("boxes => boxes.map(box => box.value)") == [
        "shipwreck", "starry_night", "woman-with-hat-matisse"]
    # the controls come from the server's description: its default, and the bound of its CPU worker
    assert tab.input_value("#param-size") == "256" and "at most 1024" in tab.inner_text("#hint-size")
    assert tab.locator("#more-params [data-field]").count() >= 10
    assert tab.is_visible("#weights-note") and "random weights" in tab.inner_text("#weights-note")
    assert page.errors() == []
    assert page.requests and all(url.startswith(playground.url + "/") for url in page.requests)  # works offline
    unnamed = tab.evaluate("""() => [...document.querySelectorAll('input, select, button, canvas, progress')]
        .filter(el => !(el.labels?.length || el.getAttribute('aria-label') || el.textContent.trim()))
        .map(el => el.outerHTML)""")
    assert unnamed == []
    assert tab.evaluate("() => [...document.images].every(image => image.hasAttribute('alt'))")
    assert tab.get_attribute("#announcer", "role") == "status"


def test_the_page_fits_a_phones_width(page):
    """At a small phone's 360 px nothing is wider than the screen: no sideways scrolling, no control cut off,
    with every section open and a photo on the painting area; and the page asks a phone for its own width."""
    tab = page.page
    tab.set_viewport_size({"width": PHONE_WIDTH, "height": 740})
    tab.click("#use-sample")
    tab.locator("#mask-styles-empty").wait_for(state="attached")
    tab.click("#settings-heading ~ details summary")
    assert tab.evaluate("document.documentElement.scrollWidth") <= PHONE_WIDTH
    cut_off = tab.evaluate("""() => [...document.querySelectorAll(
            'input, select, button, canvas, img, progress, label, summary, a, p')]
        .filter(el => el.getClientRects().length && el.getBoundingClientRect().right > innerWidth + 0.5)
        .map(el => el.id || el.outerHTML.slice(0, 80))""")
    assert cut_off == []
    assert "width=device-width" in tab.get_attribute("meta[name=viewport]", "content")
    assert page.errors() == []


def test_a_photo_and_a_painting_uploaded_show_a_preview_then_the_final_image(page, screenshots):
    tab = page.page
    tab.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            for (const id of ['preview', 'final']) {
                const image = document.getElementById(id);
                if (!image.hidden && image.src && !window.seen.some(s => s.src === image.src)) {
                    window.seen.push({id, src: image.src});
                }
            }
        }).observe(document.getElementById('result'), {subtree: true, attributes: true});
    }""")
    tab.set_input_files("#content", str(CONTENT))
    tab.set_input_files("#style-files", str(STYLE))
    tab.fill("#param-size", "64")
    tab.fill("#param-steps", "20")
    tab.click("#start")
    tab.locator("#final").wait_for(state="visible", timeout=WAIT_MS)
    seen = tab.evaluate("window.seen")
    kinds = [shown["id"] for shown in seen]
    assert "preview" in kinds and kinds.index("preview") < kinds.index("final"), kinds
    assert seen[kinds.index("preview")]["src"].startswith("data:image/jpeg;base64,")
    assert tab.evaluate("document.getElementById('final').naturalWidth") == 64
    assert tab.get_attribute("#download", "download") == "stylised.png"
    result = Image.open(io.BytesIO(downloaded(tab)))
    assert (result.format, result.size) == ("PNG", (64, 48))
    assert tab.inner_text("#progress-text").startswith("Done: 64×48 px"), tab.inner_text("#progress-text")
    assert page.errors() == []
    tab.screenshot(path=str(screenshots / "playground-two-uploads.png"), full_page=True)


def test_an_invalid_value_shows_the_servers_message_next_to_its_field(page, torchserve):
    tab = page.page
    tab.set_input_files("#content", str(CONTENT))
    tab.set_input_files("#style-files", str(STYLE))
    tab.fill("#param-size", "5")
    tab.click("#start")
    shown = tab.locator("#error-size")
    shown.wait_for(state="visible", timeout=WAIT_MS)
    refusal = refused_directly(torchserve, {"content": CONTENT.read_bytes(), "style": STYLE.read_bytes()},
                               {"size": "5"})
    assert refusal["field"] == "size" and shown.inner_text() == refusal["message"]
    assert tab.get_attribute("#param-size", "aria-invalid") == "true"
    # beside its control: in the same field, and read out with it
    assert tab.locator("#param-size").evaluate("input => input.parentElement.contains(document.getElementById("
                                               "'error-size'))")
    assert "error-size" in tab.get_attribute("#param-size", "aria-describedby").split()

    tab.fill("#param-size", "64")  # now the part: a photo that is no image
    tab.set_input_files("#content", {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"})
    tab.click("#start")
    shown = tab.locator("#error-content")
    shown.wait_for(state="visible", timeout=WAIT_MS)
    refusal = refused_directly(torchserve, {"content": b"not a photo", "style": STYLE.read_bytes()}, {"size": "64"})
    assert refusal["field"] == "content" and shown.inner_text() == refusal["message"]
    assert tab.is_hidden("#error-size")  # the earlier error is gone
    assert page.errors() == []  # each refusal came as the job's error event, not as an HTTP error


def test_painted_masks_are_sent_as_mask_1_and_on_and_the_server_paints_by_them(page, torchserve, screenshots):
    """Three styles: the upload left unpainted, the preset shipwreck painted with the mouse, woman-with-hat-matisse
    with the keyboard. The request carries mask_1 (what the others leave), mask_2 and mask_3, read off the wire;
    the server's answer to the same parts sent directly is the page's result, byte for byte, and differs from the
    answer without masks."""
    tab = page.page
    sent = []
    tab.route("**/jobs", lambda route: (sent.append(route.request.post_data_buffer), route.continue_()))
    tab.click("#use-sample")
    tab.set_input_files("#style-files", str(STYLE))
    tab.check("#preset-shipwreck")
    tab.check("#preset-woman-with-hat-matisse")
    tab.locator("#mask-styles input").nth(2).wait_for()
    tab.fill("#brush-size", "40")
    tab.locator("#mask-styles input").nth(1).check()
    drag(tab, [(0.1, 0.1), (0.1, 0.9)])  # a band down the left side
    tab.locator("#mask-styles input").nth(2).check()
    tab.focus("#mask-canvas")  # the brush starts in the middle
    tab.keyboard.press("Space")
    for _ in range(4):
        tab.keyboard.press("Shift+ArrowRight")  # 4 x 32 px to the right
    tab.keyboard.press("Space")
    tab.fill("#param-size", "64")
    tab.fill("#param-steps", "4")
    tab.click("#start")
    tab.locator("#final").wait_for(state="visible", timeout=WAIT_MS)
    tab.screenshot(path=str(screenshots / "playground.png"), full_page=True)

    parts = multipart_parts(sent[0])
    assert list(parts) == ["content", "style", "presets", "mask_1", "mask_2", "mask_3", "size", "steps", "stream",
                           "preview"]
    assert parts["content"] == CONTENT.read_bytes() and parts["presets"] == b"shipwreck,woman-with-hat-matisse"
    rest, band, line = (grey(parts[f"mask_{n}"]) for n in (1, 2, 3))
    assert band.shape == (384, 512)  # the photo's shape
    assert band[100:300, 51].min() == 255 and band[:, 150:].max() == 0  # the band, and nothing else
    assert line[192, 256:384].min() == 255 and line[:150].max() == 0 and line[:, :200].max() == 0
    assert np.abs(rest.astype(int) + np.maximum(band, line) - 255).max() <= 2  # what the other two leave
    params = {"presets": "shipwreck,woman-with-hat-matisse", "size": "64", "steps": "4"}
    images = {"content": CONTENT.read_bytes(), "style": STYLE.read_bytes()}
    masks = {f"mask_{n}": parts[f"mask_{n}"] for n in (1, 2, 3)}
    assert downloaded(tab) == predicted_directly(torchserve, {**images, **masks}, params)
    assert downloaded(tab) != predicted_directly(torchserve, images, params)
    assert page.errors() == []


def test_the_playground_outlives_the_keys_it_started_with(playground):
    """Past the first keys' expiry it still answers, with no Authorization header from the client: it renewed
    the keys through TorchServe's token API and gave nginx the new ones."""
    first = playground.first_keys
    expiry = min(datetime.fromisoformat(first[kind]["expiration time"]) for kind in ("inference", "management"))
    time.sleep(max(0.0, expiry.timestamp() - time.time()) + 1)
    keys = json.loads(playground.key_file.read_text())
    assert keys["inference"]["key"] != first["inference"]["key"], playground.log()
    assert keys["management"]["key"] != first["management"]["key"]
    assert "nginx reloaded" in playground.log()
    ping = requests.get(playground.torchserve.url("inference", "/ping"), timeout=10,
                        headers={"Authorization": f"Bearer {first['inference']['key']}"})
    assert ping.status_code == 400  # TorchServe refuses the first key now
    assert with_current_key(lambda: requests.get(playground.url + "/description", timeout=30)).status_code == 200
    request = {"files": {"content": CONTENT.read_bytes()}, "data": {"presets": "shipwreck", "size": "32", "steps": "1"}}
    answer = with_current_key(lambda: requests.post(playground.url + PREDICT_PATH, timeout=60, **request))
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png"


def test_a_jobs_events_pass_through_nginx_as_they_come(playground):
    """Each progress event of a job submitted through the playground reaches the client when the jobs service
    sends it (TorchServe's progress lines come at most every 0.5 s), not held back with the others: most of them
    come apart from the one before. The job runs for STREAMED_SECONDS, whatever the machine's speed; a proxy that
    buffered the events would deliver them in one or a few bursts."""
    arrived = []
    submitted = requests.post(playground.url + "/jobs", files={"content": CONTENT.read_bytes()}, timeout=30, data={
        "presets": "shipwreck", "size": "64", "steps": "2000", "max_seconds": str(STREAMED_SECONDS),
        "early_stop_tol": "0"})
    assert submitted.status_code == 202, submitted.text
    events_path = submitted.json()["urls"]["events"]
    with requests.get(playground.url + events_path, stream=True, timeout=120) as answer:
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "text/event-stream", answer.text
        for line in answer.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                arrived.append((time.monotonic(), line.removeprefix("event: ")))
    events = [event for _, event in arrived]
    assert events[-1] == "done" and events.count("progress") >= 4, events
    progress = [at for at, event in arrived if event == "progress"]
    apart = [later - earlier >= 0.25 for earlier, later in zip(progress, progress[1:])]
    assert sum(apart) >= len(apart) / 2, [round(at - progress[0], 2) for at in progress]


def test_of_the_management_api_only_the_description_is_reachable(playground):
    access_log = AccessLog(playground.torchserve)
    description = with_current_key(lambda: requests.get(playground.url + "/description?customized=false", timeout=30))
    assert description.status_code == 200 and "customizedMetadata" in description.json()[0]
    # our query, not theirs: TorchServe got nothing of the client's, not even appended to ours
    asked = access_log.new_uris("/models/style_transfer")
    assert asked and set(asked) == {"/models/style_transfer?customized=true"}, asked
    assert requests.post(playground.url + "/description", timeout=10).status_code == 403
    assert requests.get(playground.url + PREDICT_PATH, timeout=10).status_code == 403
    for path in ("/models", "/models/style_transfer", "/ping", "/metrics", "/token?type=inference",
                 "/samples/CREDITS.md", "/samples/masks/tubingen-sky.png", f"/jobs/{SOME_ID}/other",
                 f"/jobs/{SOME_ID}/result/y", "/jobs/order-42", "/jobs/order-42/result", "/jobs/order-42/events"):
        answer = requests.get(playground.url + path, timeout=10)
        assert answer.status_code == 404 and "json" not in answer.headers["Content-Type"], path  # nginx's own
    # of the jobs API, only what the page uses: no PUT of a job, no GET of the list, no POST to a job's status,
    # and only jobs of ids the service made (not a client's own, "order-42")
    for method, path in (("PUT", f"/jobs/{SOME_ID}"), ("GET", "/jobs"), ("POST", f"/jobs/{SOME_ID}"),
                         ("GET", f"/jobs/{SOME_ID}/cancel"), ("DELETE", f"/jobs/{SOME_ID}")):
        assert requests.request(method, playground.url + path, timeout=10).status_code == 403, (method, path)
    conf = (playground.prefix / "nginx.conf").read_text()
    assert "client_max_body_size 67108864;" in conf  # config.properties' max_request_size
    assert "proxy_read_timeout 310s;" in conf  # the model's responseTimeout (300 s) and a margin
    assert (playground.prefix / "nginx.conf").stat().st_mode & 0o077 == 0  # it holds the keys
    assert f'Bearer {playground.jobs.token}"' in conf


def start_a_timed_job(tab, preset: str, seconds: int) -> None:
    """Starts, from the page, a job on the sample photo that runs for `seconds` on any CPU: more iterations than
    it has time for, and no early stop."""
    tab.click("#use-sample")
    tab.check(f"#preset-{preset}")
    tab.fill("#param-size", "64")
    tab.fill("#param-steps", "2000")
    tab.click("#settings-heading ~ details summary")  # More parameters
    tab.fill("#param-max_seconds", str(seconds))
    tab.fill("#param-early_stop_tol", "0")
    tab.click("#start")


def test_a_job_runs_on_when_its_tab_is_closed_and_a_new_tab_shows_its_result(browser, playground):
    """The page submits a job and remembers its id; the tab is closed while the job is queued or running; a tab
    opened then watches it to its end and shows its result, and one opened after it ended shows the result at
    once, the jobs service's own bytes. A remembered job the server no longer has (expired) is forgotten with a
    message saying so."""
    first = browser.new_page()
    first.goto(playground.url + "/")
    first.locator("#preset-list li").nth(2).wait_for(timeout=WAIT_MS)
    start_a_timed_job(first, "starry_night", seconds=15)  # the next tab opens while it runs
    job_id = first.wait_for_function(f"() => localStorage.getItem('{REMEMBERED_JOB}')", timeout=WAIT_MS).json_value()
    first.close()

    for visit in ("while it runs", "after it ended"):
        tab = browser.new_page()
        watched = Watched(tab)
        tab.goto(playground.url + "/")
        if visit == "while it runs":
            assert job_status(playground, job_id)["status"] in ("queued", "running")
        tab.locator("#final").wait_for(state="visible", timeout=WAIT_MS)
        assert job_status(playground, job_id)["status"] == "succeeded", visit
        assert downloaded(tab) == requests.get(f"{playground.url}/jobs/{job_id}/result", timeout=30).content, visit
        assert tab.inner_text("#progress-text").startswith("Done: 64×48 px"), visit
        assert tab.evaluate(f"localStorage.getItem('{REMEMBERED_JOB}')") == job_id  # kept for the next visit
        assert watched.errors() == [], visit
        tab.close()

    tab = browser.new_page()
    watched = Watched(tab)
    tab.add_init_script(f"localStorage.setItem('{REMEMBERED_JOB}', '{SOME_ID}')")
    tab.goto(playground.url + "/")
    tab.locator("#progress-text", has_text="no longer on the server").wait_for(timeout=WAIT_MS)
    assert tab.evaluate(f"localStorage.getItem('{REMEMBERED_JOB}')") is None
    assert tab.is_enabled("#start") and tab.is_hidden("#form-error")
    # what the page asked for and Chromium logged: the expired job's 404s
    assert [text for text in watched.errors() if "404" not in text] == []
    tab.close()


def test_cancel_stops_the_job_and_frees_the_worker_at_once(page, playground):
    """Cancel on a job that would run for a minute: the page shows it canceled, the job's status is canceled, and
    the next job from the page starts at once on TorchServe's one worker and is done within seconds."""
    tab = page.page
    start_a_timed_job(tab, "shipwreck", seconds=60)
    tab.locator("#progress-text", has_text="Step").wait_for(timeout=WAIT_MS)
    job_id = tab.evaluate(f"localStorage.getItem('{REMEMBERED_JOB}')")
    assert tab.inner_text("#stop") == "Cancel" and tab.is_visible("#jobs-hint")
    tab.click("#stop")
    tab.locator("#progress-text", has_text="Canceled").wait_for(timeout=WAIT_MS)
    canceled_at = time.monotonic()
    assert job_status(playground, job_id)["status"] == "canceled"
    assert tab.evaluate(f"localStorage.getItem('{REMEMBERED_JOB}')") is None  # nothing to show a later visit
    assert tab.is_disabled("#stop") and tab.is_enabled("#start")

    tab.fill("#param-steps", "2")
    tab.click("#start")
    tab.locator("#final").wait_for(state="visible", timeout=WAIT_MS)
    assert time.monotonic() - canceled_at < 10, "the canceled job went on holding TorchServe's worker"
    assert job_status(playground, job_id)["status"] == "canceled"
    assert page.errors() == []


def test_in_front_of_a_cluster_it_sends_the_load_balancers_token(server, browser):
    """In front of a cluster (docs/playground.md): --inference is the load balancer, here the front of
    deploy/nginx.conf with one instance, and --inference-token-file its client token; the description comes from
    one server's management API. The page's job goes through the playground and the front to TorchServe, and
    the playground's nginx holds the client token, not the server's inference key."""
    root = Path(tempfile.mkdtemp(prefix="playground-front-"))
    root.chmod(0o755)  # nginx's workers run as nobody when nginx is started by root
    token = secrets.token_hex(32)
    (root / "token").write_text(token + "\n")
    front_port = free_port()
    hop = Hop("instance-1", free_port(), f"127.0.0.1:{server.ports['inference']}", server.key())
    front = Nginx(root / "front", render_nginx_conf(root / "front", front_port, token, [hop]), front_port)
    played, front_group = None, None
    try:
        front_group = front.start().process.pid  # its own process group, workers included
        # --jobs off: the page streams its request from TorchServe (no jobs service in front of this cluster)
        played = Playground(server, root / "playground", None, inference=front.url, token_file=root / "token").start()
        conf = (played.prefix / "nginx.conf").read_text()
        assert f"Bearer {token}" in conf and server.key("inference") not in conf
        tab = browser.new_page()
        watched, served_by = Watched(tab), []
        tab.on("response", lambda answer: answer.url.endswith(PREDICT_PATH)
               and served_by.append(answer.headers.get("x-served-by")))
        tab.goto(played.url + "/")
        tab.locator("#preset-list li").nth(2).wait_for(timeout=WAIT_MS)
        tab.click("#use-sample")
        tab.check("#preset-starry_night")
        tab.fill("#param-size", "32")
        tab.fill("#param-steps", "2")
        tab.click("#start")
        tab.locator("#final").wait_for(state="visible", timeout=WAIT_MS)
        assert served_by == ["instance-1"]  # the front's hop answered
        assert tab.inner_text("#stop") == "Stop watching" and tab.is_hidden("#jobs-hint") and not tab.evaluate(
            f"localStorage.getItem('{REMEMBERED_JOB}')")  # a stream: no job to resume
        assert watched.errors() == []
        tab.close()
    finally:
        if played is not None and played.process is not None:
            played.stop()
        front.stop()
        shutil.rmtree(root, ignore_errors=True)
    with pytest.raises(ProcessLookupError):  # no nginx left behind
        os.kill(played.nginx_pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(front_group, 0)


def test_requests_from_other_sites_and_unknown_hosts_are_refused(playground, browser):
    """A page of another origin open in the same browser (another local web server's, on another port)
    cannot make the browser queue a job with the playground's credentials: Chromium's multipart POST, which needs
    no preflight, reaches nginx with that page's Origin and is refused (403), as is its cancel of a job and its
    EventSource; so are requests to any proxied route that say they come from another site, and any Host name
    but the playground's own."""
    predict_url = playground.url + PREDICT_PATH
    job = requests.post(playground.url + "/jobs", files={"content": CONTENT.read_bytes()}, timeout=30,
                        data={"presets": "shipwreck", "size": "32", "steps": "1"}).json()
    posts = [predict_url, playground.url + "/jobs", playground.url + job["urls"]["cancel"]]
    statuses = {}
    with _other_origin() as elsewhere:
        tab = browser.new_page()
        tab.on("response", lambda answer: statuses.setdefault(answer.url, answer.status))
        tab.goto(elsewhere)
        for url in posts:
            tab.evaluate("""url => { const form = new FormData(); form.append('presets', 'shipwreck');
                return fetch(url, {method: 'POST', body: form, mode: 'no-cors'}).catch(() => null); }""", url)
        events_url = playground.url + job["urls"]["events"]
        tab.evaluate("""url => new Promise(done => { const source = new EventSource(url);
            source.onerror = () => { source.close(); done(); }; })""", events_url)
        tab.close()
    assert [statuses.get(url) for url in posts] == [403] * 3, statuses
    access_log = (playground.prefix / "logs" / "access.log").read_text()
    assert re.findall(rf'"GET {re.escape(job["urls"]["events"])} HTTP/1.1" (\d+)', access_log) == ["403"]
    files = {"content": CONTENT.read_bytes()}
    job_gets = [playground.url + path.format(id=job["id"]) for path in JOB_PATHS]
    for headers in ({"Origin": "https://elsewhere.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}, {"Origin": "null"}):
        for url in posts:
            assert requests.post(url, files=files, headers=headers, timeout=10).status_code == 403, (url, headers)
        for url in (playground.url + "/description", *job_gets):
            assert requests.get(url, headers=headers, timeout=10).status_code == 403, (url, headers)
    rebound = {"Host": f"rebound.example:{playground.port}"}
    for url in (playground.url + "/", playground.url + "/description", predict_url, *job_gets):
        assert requests.get(url, headers=rebound, timeout=10).status_code == 421, url
    assert requests.post(playground.url + "/jobs", headers=rebound, timeout=10).status_code == 421
    # from the page's own origin the jobs routes answer, with the token nginx adds
    same_origin = {"Origin": playground.url, "Sec-Fetch-Site": "same-origin"}
    assert requests.get(job_gets[0], headers=same_origin, timeout=10).status_code == 200
    assert requests.get(playground.url + f"/jobs/{SOME_ID}", headers=same_origin, timeout=10).status_code == 404
    # a page's claim to have waited since 1970 for a second at most is replaced by the playground's own
    long_waited = {**same_origin, "X-Request-Start": "t=1", "X-Request-Timeout-Ms": "1000"}
    answer = with_current_key(lambda: requests.post(predict_url, files=files, headers=long_waited, timeout=60,
                                                    data={"presets": "shipwreck", "size": "32", "steps": "1"}))
    assert answer.status_code == 200, answer.text


def test_without_its_jobs_service_it_refuses_to_start_and_says_what_to_do(torchserve, jobs, tmp_path):
    """No jobs service at --jobs, or one that refuses the token of --jobs-token-file: the playground stops with
    a message naming the fix, rather than serve a page whose every request fails."""
    common = [sys.executable, str(ROOT / "scripts" / "playground.py"), "--listen", f"127.0.0.1:{free_port()}",
              "--management", torchserve.url("management"), "--key-file", str(torchserve.workdir / "key_file.json"),
              "--wait", "2"]
    wrong = tmp_path / "token"
    wrong.write_text("not-the-jobs-token\n")
    for options, message in (
            (["--jobs", f"http://127.0.0.1:{free_port()}", "--jobs-token-file", str(jobs.workdir / "jobs_token")],
             r"no jobs service at http://127\.0\.0\.1:\d+ .*give --jobs off"),
            (["--jobs", jobs.url(), "--jobs-token-file", str(wrong)], "refuses the token of the jobs token file")):
        run = subprocess.run([*common, *options], capture_output=True, text=True, timeout=60)
        assert run.returncode != 0 and re.search(message, run.stderr), run.stderr


def test_it_listens_beyond_loopback_only_when_told_and_with_a_password(tmp_path):
    from playground import parse_args

    password = tmp_path / "password"
    password.write_text("correct horse\n")
    for refused in (["--listen", "0.0.0.0:8090"], ["--listen", "192.0.2.7:8090", "--public"],
                    ["--listen", "0.0.0.0:8090", "--public", "--password-file", str(password)]):
        with pytest.raises(SystemExit):
            parse_args(refused)
    allowed = parse_args(["--listen", "0.0.0.0:8090", "--public", "--password-file", str(password),
                          "--host-name", "playground.example"])
    assert allowed.public and allowed.host_name == ["playground.example"]


# --- helpers ---


@contextlib.contextmanager
def _other_origin():
    """An empty page served by another web server on this machine: its URL."""
    class Empty(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html></html>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def drag(tab, points: list[tuple[float, float]]) -> None:
    """A mouse stroke through `points`, given as fractions of the painting area."""
    canvas = tab.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    tab.mouse.move(*at[0])
    tab.mouse.down()
    for point in at[1:]:
        tab.mouse.move(*point, steps=8)
    tab.mouse.up()


def downloaded(tab) -> bytes:
    """What the page's download link saves, by a click on it."""
    with tab.expect_download() as download:
        tab.click("#download")
    assert download.value.suggested_filename == tab.get_attribute("#download", "download")
    return Path(download.value.path()).read_bytes()


def multipart_parts(body: bytes) -> dict[str, bytes]:
    """The parts of a multipart/form-data body by name, in order (RFC 7578: each part is a delimiter line,
    headers, an empty line and the data, up to the CRLF before the next delimiter)."""
    delimiter = body.split(b"\r\n", 1)[0]
    parts = {}
    for chunk in body.split(delimiter)[1:-1]:
        headers, data = chunk[2:].split(b"\r\n\r\n", 1)
        name = re.search(rb'; name="([^"]*)"', headers).group(1).decode()
        parts[name] = data[:-2]
    return parts


def grey(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("L"))


def job_status(playground, job_id: str) -> dict:
    """The job's status, asked through the playground (whose nginx adds the jobs token)."""
    answer = requests.get(f"{playground.url}/jobs/{job_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def refused_directly(torchserve, files: dict, data: dict) -> dict:
    answer = with_current_key(lambda: requests.post(torchserve.url("inference", PREDICT_PATH), files=files,
                                                    data=data, headers=torchserve.auth(), timeout=60))
    assert answer.status_code == 400
    return answer.json()


def predicted_directly(torchserve, files: dict, data: dict) -> bytes:
    answer = with_current_key(lambda: requests.post(torchserve.url("inference", PREDICT_PATH), files=files,
                                                    data=data, headers=torchserve.auth(), timeout=120))
    assert answer.status_code == 200, answer.text
    return answer.content


class AccessLog:
    """What TorchServe logs in its access log (logs/access_log.log) from now on: the URIs the proxy really passed
    on. Its log4j writes a line a moment after answering."""

    def __init__(self, torchserve):
        self.path = torchserve.workdir / "logs" / "access_log.log"
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def new_uris(self, path: str, timeout: float = 10) -> list[str]:
        pattern = re.compile(rf'"[A-Z]+ ({re.escape(path)}[^ "]*) HTTP/')
        deadline = time.monotonic() + timeout
        while True:
            with open(self.path, "rb") as log:
                log.seek(self.start)
                found = pattern.findall(log.read().decode(errors="replace"))
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def with_current_key(send) -> requests.Response:
    """`send()`'s answer; sent once more, as the page does, if it came in the moment a key was renewed (before
    nginx had the new key, or between reading the key file and TorchServe checking the key)."""
    answer = send()
    if answer.status_code == 400 and answer.json().get("type") == "InvalidKeyException":
        time.sleep(1)
        answer = send()
    return answer
