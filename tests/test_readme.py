"""The README and the documentation site (docs/, mkdocs.yml) stay true: the site builds with no broken link and no
page left out; the parameters, limits, commands and figures the pages state are those of the code and the results."""

import dataclasses
import functools
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from hooks import script_parser  # docs/hooks.py
from style_engine.errors import ParamError
from style_engine.params import describe_params, parse_params

README = (ROOT / "README.md").read_text()
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
DOCS = ROOT / "docs"
PAGES = {path.name: path.read_text() for path in sorted(DOCS.glob("*.md"))}
MODEL_CONFIG = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
QUICK = json.loads((ROOT / "benchmarks" / "results" / "quick.json").read_text())


def build_site(config, site_dir):
    """`mkdocs build --strict` of `config` into `site_dir`: the finished process, its output in stdout."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The site built from the repository, with the repository's state (ignored files too) before and after."""
    site_dir, before = tmp_path_factory.mktemp("site"), _git_status()
    build = build_site(ROOT / "mkdocs.yml", site_dir)
    assert build.returncode == 0, build.stdout + build.stderr
    return site_dir, before, _git_status()


@pytest.fixture(scope="module")
def site(built):
    return built[0]


def test_the_site_builds_strictly_without_touching_the_repository(built):
    site, before, after = built
    assert before == after
    assert (site / "index.html").is_file() and (site / "openapi.yaml").is_file()
    assert (site / "changelog.html").is_file() and (site / "LICENSE").is_file()
    assert (site / "benchmarks" / "results" / "loss_vs_time-full.png").is_file()
    for page in PAGES:
        assert (site / page.replace(".md", ".html")).is_file(), page


def test_a_broken_link_an_anchor_or_a_page_left_out_fails_the_build(tmp_path):
    docs = shutil.copytree(DOCS, tmp_path / "docs")
    (docs / "api.md").write_text(PAGES["api.md"].replace("(jobs.md)", "(jobz.md)", 1)
                                 .replace("(limits.md#time)", "(limits.md#no-such-section)", 1))
    (docs / "orphan.md").write_text("# Not in the nav\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    for paths in ("hooks", "watch"):  # relative to the configuration file's folder
        config[paths] = [str(ROOT / path) for path in config.get(paths, [])]
    python = next(plugin for plugin in config["plugins"] if "mkdocstrings" in plugin)
    python["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "handler")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    build = build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert build.returncode != 0
    warnings = _warnings(build.stderr)
    for complaint in ("'jobz.md'", "'#no-such-section'", "orphan.md"):
        assert complaint in warnings, complaint


def test_every_parameter_is_on_the_parameters_page_with_its_default(site):
    page = (site / "parameters.html").read_text()
    rows = {name: html.unescape(default) for name, default in
            re.findall(r"<tr>\s*<td><code>(\w+)</code></td>\s*<td><code>(.*?)</code></td>", page)}
    for param in describe_params():
        assert param["name"] in rows, f"docs/parameters.md lacks parameter {param['name']}"
        assert json.loads(rows[param["name"]]) == param["default"], param["name"]
    size_row = re.search(r"<tr>\s*<td><code>size</code></td>.*?</tr>", page, flags=re.DOTALL).group(0)
    cpu_size = MODEL_CONFIG["handler"]["device_overrides"]["cpu"]["maxima"]["size"]
    assert f"<code>{cpu_size}</code> on a CPU" in size_row


def test_the_readme_is_the_home_page(site):
    home = (site / "index.html").read_text()
    assert "scripts/serve.sh" in home and 'href="api.html"' in home and 'src="masks.png"' in home


def test_the_readme_points_to_every_page_of_the_site():
    nav = json.dumps(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    pages = set(re.findall(r'"([\w-]+\.md)"', nav)) - {"index.md", "changelog.md"}  # README.md, CHANGELOG.md
    assert pages == set(PAGES), "mkdocs.yml's nav and docs/*.md differ"
    assert set(re.findall(r"\]\(docs/([\w-]+\.md)\)", README)) == pages


def test_the_readme_stays_short():
    assert len(README.encode()) <= 12 * 1024


def test_ci_runs_the_readme_test_command():
    for text in (README, PAGES["contributing.md"]):
        assert "```bash\nscripts/test.sh\n```" in text and "```bash\nscripts/serve.sh\n```" in text
    assert "exec scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_reference_to_a_page_or_section_names_one():
    headings = {"README.md": _headings(README), **{f"docs/{name}": _headings(text) for name, text in PAGES.items()}}
    for name, text in _tracked_texts():
        for page, section in re.findall(r'(README(?:\.md)?|docs/[\w-]+\.md),? \\?"([A-Z][^"\\]*)', text):
            page = "README.md" if page.startswith("README") else page
            assert page in headings, f"{name}: no page {page}"
            assert section in headings[page], f"{name}: no section {section!r} in {page}"
        for page in re.findall(r"docs/[\w-]+\.(?:md|png)", text):
            assert (ROOT / page).is_file(), f"{name}: no file {page}"


COMMAND = r"((?:scripts|benchmarks|tests/support)/[\w-]+\.(?:py|sh))((?:\\\n|[^\n`])*)"  # a script, its arguments


def test_every_command_in_the_docs_names_a_script_and_options_it_has():
    commands = 0
    for name, text in [("README.md", README), *PAGES.items()]:
        for script, arguments in re.findall(COMMAND, text):
            assert (ROOT / script).is_file(), f"{name}: no script {script}"
            unknown = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", arguments)) - _options(script)
            assert not unknown, f"{name}: {script} has no option {sorted(unknown)}"
            commands += 1
    assert commands > 20  # the pattern finds the commands


@pytest.mark.parametrize("page, script, section", [("client.md", "scripts/stylize.py", "# The client"),
                                                   ("playground.md", "scripts/playground.sh", "## Options")])
def test_every_option_a_page_describes_is_its_scripts(page, script, section):
    """The options a page lists for a script, in the section that lists them, are the script's."""
    listed = PAGES[page].split(section + "\n", 1)[1].split("\n## ", 1)[0]
    described = set(re.findall(r"`(--[a-z][\w-]*)", listed))
    assert described and described <= _options(script), sorted(described - _options(script))


def test_the_limits_table_gives_the_configured_limits():
    handler, cpu = MODEL_CONFIG["handler"], MODEL_CONFIG["handler"]["device_overrides"]["cpu"]
    properties = dict(re.findall(r"^(\w+)=(.*)$", (ROOT / "config.properties").read_text(), flags=re.MULTILINE))
    rows = _limits_rows()
    expected = {  # row: what its GPU and its CPU cells say
        "max_request_size": [f"{int(properties['max_request_size']) // 2**20} MiB"] * 2,
        "max_image_pixels": [f"{handler['max_image_pixels']:,}", "the same"],
        "max_styles": [str(handler["max_styles"])] * 2,
        "max_style_pixels": [f"{handler['max_style_pixels']:,}", f"{cpu['max_style_pixels']:,}"],
        "maxima.size": [f"{handler['maxima']['size']} px", f"{cpu['maxima']['size']} px"],
        "maxima": [f"{handler['maxima']['steps']}, {handler['maxima']['max_seconds']} s", "the same"],
        "job_queue_size": [properties["job_queue_size"]] * 2,
        "max_seconds": [f"{handler['maxima']['max_seconds']} s, {handler['reply_margin_seconds']} s "
                        f"(`reply_margin_seconds`) under `responseTimeout` ({MODEL_CONFIG['responseTimeout']} s)",
                        "the same"],
    }
    for key, cells in expected.items():
        assert all(cell.startswith(said) for cell, said in zip(rows[key], cells)), (key, rows[key], cells)
    assert f"`max_seconds`, default {handler['defaults']['max_seconds']} s" in PAGES["limits.md"]


def test_the_time_limits_are_the_configured_ones():
    handler, timeout = MODEL_CONFIG["handler"], MODEL_CONFIG["responseTimeout"]
    time = " ".join(PAGES["limits.md"].split("\n## Time\n")[1].split("\n## ")[0].split())
    assert f"`responseTimeout` ({timeout} s)" in time
    assert (f"gives one call {timeout - handler['reply_margin_seconds']} s (`responseTimeout` less "
            f"`reply_margin_seconds`, {handler['reply_margin_seconds']} s") in time
    assert f"`max_seconds` is capped at {handler['maxima']['max_seconds']} s" in time


def test_every_configured_value_the_docs_give_is_the_configured_one():
    docs = " ".join(" ".join([README, *PAGES.values()]).split())
    expected = {  # how the docs write the value: the value
        r"`responseTimeout`,? \((\d+) s": MODEL_CONFIG["responseTimeout"],
        r"`batchSize`,? \(?(\d+)": MODEL_CONFIG["batchSize"],
        r"`maxBatchDelay`,? \(?(\d+) ms": MODEL_CONFIG["maxBatchDelay"],
        r"`memory_margin`,? \(?(\d+) %": round(MODEL_CONFIG["handler"]["memory_margin"] * 100),
    }
    for pattern, value in expected.items():
        found = [int(number) for number in re.findall(pattern, docs)]
        assert found and set(found) == {value}, (pattern, found, value)


def test_the_answer_and_the_error_the_readme_shows_are_the_servers():
    documented = set(re.findall(r"X-Style-[\w-]+(?=:)", (ROOT / "openapi.yaml").read_text()))
    # the headers the jobs service sends on its own requests (to TorchServe, and webhooks), which no answer carries
    documented |= {name for source in (ROOT / "jobs").glob("*.py")
                   for name in re.findall(r"\"(X-Style-[\w-]+)\"", source.read_text())}
    for name, text in [("README.md", README), *PAGES.items()]:
        named = set(re.findall(r"X-Style-[A-Za-z]+(?:-[A-Z][a-z]+)*", text))
        assert named <= documented, (name, named - documented)
    error = json.loads(re.search(r"^```json\n(\{\"code\": 400.*\})\n```$", PAGES["api.md"],
                                 flags=re.MULTILINE).group(1))
    with pytest.raises(ParamError) as refusal:
        parse_params({error["field"]: "many"}, maxima=MODEL_CONFIG["handler"]["maxima"])
    assert (str(refusal.value), refusal.value.field) == (error["message"], error["field"])


def test_the_readmes_commands_are_the_quickstarts():
    quickstart = set(_commands(PAGES["quickstart.md"]))
    readme = _commands(README)
    assert readme and set(readme) <= quickstart | {"scripts/test.sh"}, sorted(set(readme) - quickstart)


def test_the_first_calls_time_is_the_results_files_with_its_machine():
    default = QUICK["coarse_to_fine"]["default_request"]["coarse_to_fine"]
    smaller = QUICK["server_overhead"]
    assert (default["steps"], QUICK["coarse_to_fine"]["size"]) == (200, 256)  # the default request
    assert (smaller["params"]["size"], smaller["params"]["steps"]) == (128, 60)  # what the pages ask for
    for text in (README, PAGES["quickstart.md"]):
        said = " ".join(text.split())
        assert f"{default['seconds']:.1f} s on 2 cores of an {QUICK['machine']['cpu']}" in said
        assert f"{smaller['server_seconds']:.1f} s" in said and "-F size=128 -F steps=60" in said
        assert "benchmarks/results/quick.json" in said
    assert QUICK["machine"]["date"] in PAGES["quickstart.md"] and QUICK["machine"]["threads"] == 2


def test_links_work_on_the_forge_too():
    """Relative links are written for the repository: each names a file there, from the file it is in."""
    for name, text in [("README.md", README), ("CHANGELOG.md", CHANGELOG),
                       *((f"docs/{page}", text) for page, text in PAGES.items())]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", _without_code(text)):
            if not re.match(r"[a-z][a-z+.-]*:", target):
                assert ((ROOT / name).parent / target).exists(), f"{name}: {target}"


def test_no_file_points_outside_the_repository_or_tells_how_it_was_built():
    """Docs, code, tests and deployment files speak of the project as it is: what they cite is in it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    names = [name for name in tracked if name != "tests/test_readme.py" and
             Path(name).suffix in {".md", ".py", ".js", ".html", ".css", ".yaml", ".yml", ".sh", ".conf", ".toml"}]
    assert "handler/style_transfer_handler.py" in names and "docs/api.md" in names
    for name in names:
        for said in re.findall(r"CONTRACT|\blent\b|\bissue \d+|\bcommit [0-9a-f]{7}|\.\./shared",
                               (ROOT / name).read_text()):
            pytest.fail(f"{name} says {said!r}")


def test_the_references_are_made_from_the_code(site):
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    http = (site / "http-api.html").read_text()
    for path, item in spec["paths"].items():
        for method in set(item) & {"get", "put", "post", "delete"}:
            assert f">{method.upper()} {path}<a" in http, (method, path)
    for schema in spec["components"]["schemas"]:
        assert f'id="{schema.lower()}"' in http, schema
    cli = html.unescape((site / "cli.html").read_text())
    stylize = [option for param in describe_params() for option in [f"--{param['name'].replace('_', '-')}"]]
    assert all(f"{option} " in cli for option in stylize if option not in ("--presets", "--response", "--stream"))
    settings = (site / "jobs-settings.html").read_text()
    from jobs.config import PREFIX, JobsConfig
    for field in dataclasses.fields(JobsConfig):
        assert f"<code>{PREFIX}{field.name.upper()}</code>" in settings, field.name
    python_api = (site / "python-api.html").read_text()
    for name in ("stylize", "parse_params", "load_features_state_dict", "VGGFeatures", "StyleResult"):
        assert f'id="style_engine.{name}"' in python_api, name


def test_the_license_is_apache_2():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")
    assert "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()


def test_the_readme_headline_is_the_full_benchmark_run():
    summary = json.loads((ROOT / "benchmarks" / "results" / "full.json").read_text())
    seed = summary["time_to_seed_loss"]
    headline = " ".join(README.split("## Benchmarks, in one line")[1].split("\n## ")[0].split())
    assert f"{seed['auto']['speedup']:.1f}× sooner" in headline
    assert f"({seed['auto']['steps']} L-BFGS iterations against {seed['seed_steps']} Adam steps at {seed['size']} px)" \
        in headline
    assert f"adds {(summary['summary']['server_overhead_ratio'] - 1) * 100:.1f} %" in headline


def _commands(markdown):
    """The command lines of the page's bash blocks, continuation lines joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)
    return [" ".join(line.split()) for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _without_code(markdown):
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


def _warnings(log):
    """The WARNING messages of a MkDocs log, with their continuation lines."""
    kept, level = [], None
    for line in log.splitlines():
        level = line.split(maxsplit=1)[0] if re.match(r"(DEBUG|INFO|WARNING|ERROR)\b", line) else level
        if level == "WARNING":
            kept.append(line)
    return "\n".join(kept)


def _headings(markdown):
    return set(re.findall(r"^#+ (.+?)$", markdown, flags=re.MULTILINE))


def _tracked_texts():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.split():
        path = ROOT / name
        if path.suffix in {".py", ".yaml", ".yml", ".properties", ".sh", ".conf", ".json", ".dockerignore", ""} \
                and path.is_file():
            yield name, path.read_text(errors="replace")


@functools.cache
def _options(script):
    """The options `script` accepts: those of the argparse parser its main() builds, or for a shell script the
    flags it names and those of the Python script it runs."""
    text = (ROOT / script).read_text()
    if script.endswith(".sh"):
        runs = re.findall(r"exec \.venv/bin/python (scripts/[\w-]+\.py)", text)
        return set(re.findall(r"--[a-z][\w-]*", text)).union(*(_options(target) for target in runs))
    if "def main(" not in text:  # a module the docs name, not a command
        return set()
    return {option for action in script_parser(ROOT / script)._actions for option in action.option_strings}


def _limits_rows():
    """docs/limits.md's first table: each `key` its first cell names -> its other cells."""
    rows = {}
    for line in PAGES["limits.md"].split("## What one request may ask for")[1].split("\n## ")[0].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        for key in re.findall(r"`([\w.]+)`", cells[0]) if line.startswith("| ") else []:
            rows[key] = cells[1:]
    return rows


def _git_status():
    """Changed and untracked files, and the ignored ones but for Python's byte code, which any import writes."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    return [line for line in status.splitlines() if "__pycache__" not in line]
