"""MkDocs hooks (mkdocs.yml): what the site takes from the repository at build time, so that no copy can drift.

- The home page is README.md itself, its links to docs/ pages made relative to the site.
- openapi.yaml and the plots of benchmarks/results/ are served at their repository paths.
- docs/parameters.md's table is made from style_engine.params.describe_params, with the defaults and maxima
  that handler/model-config.yaml sets for GPU and CPU workers beside the engine's.

Everything is added to the build in memory: nothing is written into the repository.
"""

import json
import re
import sys
from pathlib import Path

import yaml
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS_MARKER = "<!-- the parameters table, made by docs/hooks.py -->"
# Files outside docs/ that pages link to, served at their repository paths.
REPOSITORY_FILES = ("openapi.yaml", "benchmarks/results/*.png")


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=readme_as_home_page()))
    for pattern in REPOSITORY_FILES:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "parameters.md":
        if PARAMETERS_MARKER not in markdown:
            raise ValueError(f"docs/parameters.md lacks the line {PARAMETERS_MARKER}")
        return markdown.replace(PARAMETERS_MARKER, parameters_table())
    return markdown


def readme_as_home_page() -> str:
    """README.md with its links into docs/ made relative to the site's root, where the pages are."""
    return re.sub(r"\]\(docs/", "](", (ROOT / "README.md").read_text())


def parameters_table() -> str:
    """Every request parameter: the engine's default and bounds, and what the archive's servers set."""
    sys.path.insert(0, str(ROOT / "handler"))
    from server_config import ServerConfig
    from style_engine.params import describe_params

    model_yaml = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    gpu = ServerConfig.from_model_yaml(model_yaml, "cuda")
    cpu = ServerConfig.from_model_yaml(model_yaml, "cpu")
    rows = ["| name | default | allowed | the archive sets | meaning |",
            "| --- | --- | --- | --- | --- |"]
    for param in describe_params():
        name = param["name"]
        rows.append(f"| `{name}` | `{json.dumps(param['default'])}` | {_escape(param['allowed'])} | "
                    f"{_server_setting(name, gpu, cpu)} | {_escape(param['doc'])} |")
    return "\n".join(rows)


def _server_setting(name: str, gpu, cpu) -> str:
    """The archive's default and maximum for `name`, where it sets them, per kind of worker."""
    said = []
    if name in gpu.defaults or name in cpu.defaults:
        said.append(_per_device("default", gpu.defaults.get(name), cpu.defaults.get(name)))
    if name in gpu.maxima or name in cpu.maxima:
        said.append(_per_device("at most", gpu.maxima.get(name), cpu.maxima.get(name)))
    return "; ".join(said)


def _per_device(what: str, on_gpu, on_cpu) -> str:
    if on_gpu == on_cpu:
        return f"{what} `{json.dumps(on_gpu)}`"
    return f"{what} `{json.dumps(on_gpu)}` on a GPU, `{json.dumps(on_cpu)}` on a CPU"


def _escape(text: str) -> str:
    """Text for a table cell: a | would end the cell."""
    return text.replace("|", "\\|")
