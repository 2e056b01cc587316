"""MkDocs hooks (mkdocs.yml): what the site takes from the repository at build time, so that no copy can drift.

- The home page is README.md itself, and the changelog page CHANGELOG.md; openapi.yaml, LICENSE and the plots of
  benchmarks/results/ are served at their repository paths.
- Links are written as they work on the forge, relative to the file in the repository (`../openapi.yaml` from
  docs/, `docs/api.md` from the README); each is rewritten into the site's own layout here.
- The references are made from the code where a page holds their marker: docs/parameters.md's table from
  style_engine.params.describe_params (with what handler/model-config.yaml sets for GPU and CPU workers),
  openapi.yaml rendered as Markdown, the options of a script from its own argparse parser, and the jobs service's
  settings from jobs/config.py. The engine's Python API is mkdocstrings' (docs/python-api.md).

Everything is added to the build in memory: nothing is written into the repository.
"""

import argparse
import ast
import importlib.util
import io
import json
import posixpath
import re
import sys
import tokenize
from pathlib import Path

import yaml
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# Markdown files outside docs/ that are pages of the site: repository path -> the page's path in the site.
REPOSITORY_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
# Other files outside docs/ that pages link to, served at their repository paths.
REPOSITORY_FILES = ("openapi.yaml", "LICENSE", "benchmarks/results/*.png")
PARAMETERS_MARKER = "<!-- the parameters table, made by docs/hooks.py -->"
OPENAPI_MARKER = "<!-- openapi.yaml, rendered by docs/hooks.py -->"
JOBS_SETTINGS_MARKER = "<!-- the jobs service's settings, made by docs/hooks.py from jobs/config.py -->"
OPTIONS_MARKER = re.compile(r"<!-- the options of ([\w/.-]+), made by docs/hooks.py from its parser -->")
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.MULTILINE | re.DOTALL)


def on_files(files, config):
    for source, page in REPOSITORY_PAGES.items():
        files.append(File.generated(config, page, content=(ROOT / source).read_text()))
    for pattern in REPOSITORY_FILES:
        for path in sorted(ROOT.glob(pattern)):
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = site_links(markdown, page.file.src_uri)
    if page.file.src_uri == "parameters.md":
        markdown = _expand(markdown, PARAMETERS_MARKER, parameters_table)
    if page.file.src_uri == "http-api.md":
        markdown = _expand(markdown, OPENAPI_MARKER, lambda: openapi_markdown(ROOT / "openapi.yaml"))
    if page.file.src_uri == "jobs-settings.md":
        markdown = _expand(markdown, JOBS_SETTINGS_MARKER, lambda: jobs_settings_table(ROOT / "jobs" / "config.py"))
    return OPTIONS_MARKER.sub(lambda marker: options_markdown(ROOT / marker.group(1)), markdown)


def _expand(markdown: str, marker: str, make) -> str:
    if marker not in markdown:
        raise ValueError(f"a page the hooks fill lacks the line {marker}")
    return markdown.replace(marker, make())


# --- links -------------------------------------------------------------------------------------------------------


def site_links(markdown: str, src_uri: str) -> str:
    """The page's relative links, written for the repository, made to work in the site. Code blocks are left
    as they are."""
    source = next((repo for repo, page in REPOSITORY_PAGES.items() if page == src_uri), f"docs/{src_uri}")
    parts, last = [], 0
    for fence in FENCE.finditer(markdown):
        parts += [_links_of(markdown[last:fence.start()], source, src_uri), fence.group(0)]
        last = fence.end()
    return "".join([*parts, _links_of(markdown[last:], source, src_uri)])


def _links_of(text: str, source: str, src_uri: str) -> str:
    def rewrite(link):
        target, anchor = (link.group(2).split("#", 1) + [""])[:2]
        if not target or re.match(r"[a-z][a-z+.-]*:", target):  # an anchor on the page, or a URL
            return link.group(0)
        repository_path = posixpath.normpath(posixpath.join(posixpath.dirname(source), target))
        in_site = site_path(repository_path)
        relative = posixpath.relpath(in_site, posixpath.dirname(src_uri) or ".")
        return f"{link.group(1)}{relative}{'#' + anchor if anchor else ''}{link.group(3)}"
    return LINK.sub(rewrite, text)


def site_path(repository_path: str) -> str:
    """Where a repository file is in the site; what the site does not serve keeps its path, which a strict
    build then reports as a broken link."""
    if repository_path in REPOSITORY_PAGES:
        return REPOSITORY_PAGES[repository_path]
    if repository_path.startswith("docs/"):
        return repository_path.removeprefix("docs/")
    return repository_path


# --- the parameters ----------------------------------------------------------------------------------------------


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
        rows.append(f"| `{name}` | `{json.dumps(param['default'])}` | {_cell(param['allowed'])} | "
                    f"{_server_setting(name, gpu, cpu)} | {_cell(param['doc'])} |")
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


def _cell(text) -> str:
    """Text for a table cell: one line, and a | would end the cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- a script's options ------------------------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised in place of parsing the command line: it carries the parser a script's main() built."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def script_parser(script: Path) -> argparse.ArgumentParser:
    """The argparse parser that `script`'s main() builds, taken from it where it would parse: what --help says."""
    sys.path[:0] = [str(script.parent), str(ROOT / "handler"), str(ROOT / "scripts")]
    spec = importlib.util.spec_from_file_location(f"docs_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)
    argparse.ArgumentParser.parse_args = capture
    try:
        module.main([])
    except _Parsed as parsed:
        parsed.parser.prog = script.name
        return parsed.parser
    finally:
        argparse.ArgumentParser.parse_args = parse
    raise ValueError(f"{script}: main() parsed no arguments with argparse")


def options_markdown(script: Path) -> str:
    """The usage line and a table per group of `script`'s options: each with its argument, default and help."""
    parser = script_parser(script)
    formatter = parser._get_formatter()
    lines = ["```text", parser.format_usage().strip(), "```"]
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        lines += ["", f"**{group.title[:1].upper()}{group.title[1:]}**", "",
                  "| option | default | what it does |", "| --- | --- | --- |"]
        for action in actions:
            shown = action.default not in (None, False, [], argparse.SUPPRESS) and not action.required
            default = f"`{_repository_relative(action.default)}`" if shown else ""
            help_text = formatter._expand_help(action) if action.help else ""
            lines.append(f"| {_cell(_invocation(action))} | {_cell(default)} | {_cell(help_text)} |")
    return "\n".join(lines)


def _repository_relative(value) -> str:
    """A default path inside the repository as the repository names it, not as this checkout's absolute path."""
    text = str(value)
    return Path(text).relative_to(ROOT).as_posix() + "/" if text.startswith(f"{ROOT}/") else text


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    if action.nargs == 0:
        return ", ".join(f"`{option}`" for option in action.option_strings)
    metavar = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                 else action.dest.upper())
    return ", ".join(f"`{option} {metavar}`" for option in action.option_strings)


# --- the jobs service's settings ---------------------------------------------------------------------------------


def jobs_settings_table(config_py: Path) -> str:
    """Every field of JobsConfig as its environment variable, its default and what its comments say."""
    source = config_py.read_text()
    tree = ast.parse(source)
    prefix = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                  and getattr(node.targets[0], "id", "") == "PREFIX")
    (config,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "JobsConfig"]
    comments = _comments_by_line(source)
    rows = ["| variable | default | what it sets |", "| --- | --- | --- |"]
    for field in config.body:
        if not isinstance(field, ast.AnnAssign):
            continue
        rows.append(f"| `{prefix}{field.target.id.upper()}` | `{ast.literal_eval(field.value)!r}` | "
                    f"{_cell(_field_comment(field.lineno, comments))} |")
    return "\n".join(rows)


def _comments_by_line(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (the comment's text, whether the line holds nothing else)."""
    lines = source.splitlines()
    return {token.start[0]: (token.string.lstrip("#").strip(), not lines[token.start[0] - 1][:token.start[1]].strip())
            for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}


def _field_comment(line: int, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment lines just above a field and the comment at the end of its line, joined."""
    above, previous = [], line - 1
    while previous in comments and comments[previous][1]:
        above.insert(0, comments[previous][0])
        previous -= 1
    trailing = [comments[line][0]] if line in comments and not comments[line][1] else []
    return " ".join(above + trailing)


# --- openapi.yaml ------------------------------------------------------------------------------------------------


def openapi_markdown(spec_path: Path) -> str:
    """openapi.yaml as Markdown: each operation with its server, token, parameters, bodies and answers, then the
    tokens and every schema, the references between them as links within the page."""
    return _OpenApiPage(yaml.safe_load(spec_path.read_text())).markdown()


class _OpenApiPage:
    METHODS = ("get", "put", "post", "delete", "patch")

    def __init__(self, spec: dict):
        self.spec = spec

    def markdown(self) -> str:
        lines = ["## Operations", ""]
        for path, item in self.spec["paths"].items():
            for method in self.METHODS:
                if method in item:
                    lines += self.operation(path, item, method, item[method])
        if self.spec.get("webhooks"):
            lines += ["## Webhooks", ""]
            for name, item in self.spec["webhooks"].items():
                for method in self.METHODS:
                    if method in item:
                        lines += self.operation(name, item, method, item[method], webhook=True)
        lines += ["## Authentication", ""]
        for name, scheme in self.spec["components"]["securitySchemes"].items():
            lines += [f"### {name}", "", f"HTTP `{scheme['scheme']}` token.", "",
                      scheme.get("description", "").strip(), ""]
        lines += ["## Schemas", ""]
        for name, schema in self.spec["components"]["schemas"].items():
            lines += self.schema_section(name, schema)
        return "\n".join(lines)

    # operations
    def operation(self, path: str, item: dict, method: str, operation: dict, webhook: bool = False) -> list[str]:
        """An operation of a path, or with `webhook` a request the service sends (`path`: the webhook's name)."""
        servers = operation.get("servers") or item.get("servers") or self.spec["servers"]
        security = operation.get("security", self.spec.get("security", []))
        schemes = [f"[`{name}`](#{name.lower()})" for requirement in security for name in requirement]
        where = ("Sent by the jobs service to the job's `webhook` URL." if webhook else
                 f"Server: `{servers[0]['url']}`. Token: {', '.join(schemes) or 'none'}.")
        lines = [f"### {'Webhook' if webhook else method.upper()} {path}", "", f"**{operation['summary']}.**", "",
                 where, ""]
        if operation.get("description"):
            lines += [operation["description"].strip(), ""]
        parameters = [self.resolve(p) for p in item.get("parameters", []) + operation.get("parameters", [])]
        if parameters:
            lines += ["| parameter | in | required | value | meaning |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
                      f"{_cell(self.describe(p['schema']))} | {_cell(p.get('description', ''))} |" for p in parameters]
            lines.append("")
        if "requestBody" in operation:
            lines += ["| request body | schema |", "| --- | --- |"]
            lines += [f"| `{media}` | {_cell(self.describe(content['schema']))} |"
                      for media, content in self.resolve(operation["requestBody"])["content"].items()]
            lines.append("")
        lines += ["| status | meaning | body | headers |", "| --- | --- | --- | --- |"]
        for status, response in operation["responses"].items():
            response = self.resolve(response)
            bodies = "; ".join(f"`{media}`: {self.describe(content['schema'])}"
                               for media, content in response.get("content", {}).items())
            headers = "; ".join(f"`{name}`: {header.get('description', self.describe(header['schema']))}"
                                for name, header in response.get("headers", {}).items())
            lines.append(f"| {status} | {_cell(response['description'])} | {_cell(bodies)} | {_cell(headers)} |")
        return lines + [""]

    # schemas
    def schema_section(self, name: str, schema: dict) -> list[str]:
        lines = [f"### {name}", ""]
        if schema.get("description"):
            lines += [schema["description"].strip(), ""]
        properties = schema.get("properties", {})
        if properties and schema.get("type") == "object":
            required = set(schema.get("required", []))
            lines += ["| field | required | value | meaning |", "| --- | --- | --- | --- |"]
            for field, value in properties.items():
                meaning = value.get("description") or self.resolve(value).get("description", "")
                lines.append(f"| `{field}` | {'yes' if field in required else 'no'} | "
                             f"{_cell(self.describe(value, with_description=False))} | {_cell(meaning)} |")
            for pattern, value in schema.get("patternProperties", {}).items():
                lines.append(f"| fields matching `{pattern}` | no | {_cell(self.describe(value))} | |")
            if schema.get("additionalProperties") is False:
                lines.append("| any other field | | refused | |")
        else:
            lines.append(self.describe(schema, with_description=False))
        return lines + [""]

    def describe(self, schema: dict, with_description: bool = False) -> str:
        """A schema in a few words, a reference to a named schema as a link to its section."""
        ref = schema.get("$ref")
        if ref and ref.count("/") == 3 and ref.startswith("#/components/schemas/"):
            name = ref.rsplit("/", 1)[1]
            said = f"[{name}](#{name.lower()})"
            extra = {key: value for key, value in schema.items() if key not in ("$ref", "description")}
            return said + (f" ({self.describe(extra)})" if extra else "")
        if ref:
            return self.describe({**self.resolve(schema), **{k: v for k, v in schema.items() if k != "$ref"}})
        words = []
        for combiner, joiner in (("oneOf", " or "), ("anyOf", " or "), ("allOf", " and ")):
            if combiner in schema:
                words.append(joiner.join(self.describe(part) for part in schema[combiner]))
        if "const" in schema:
            words.append(f"`{json.dumps(schema['const'])}`")
        if "enum" in schema:
            words.append("one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"]))
        kinds = schema.get("type")
        if kinds and "enum" not in schema:
            kinds = kinds if isinstance(kinds, list) else [kinds]
            words.append(" or ".join(self._kind(kind, schema) for kind in kinds))
        words += self._bounds(schema)
        if "default" in schema:
            words.append(f"default `{json.dumps(schema['default'])}`")
        if with_description and schema.get("description"):
            words.append(schema["description"].strip())
        return ", ".join(word for word in words if word) or "any value"

    def _kind(self, kind: str, schema: dict) -> str:
        if kind == "array" and "items" in schema:
            return f"array of {self.describe(schema['items'])}"
        if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
            names = self.describe(schema["propertyNames"]) if "propertyNames" in schema else "names"
            return f"object of {names} to {self.describe(schema['additionalProperties'])}"
        if kind == "string" and "contentMediaType" in schema and schema.get("format") != "binary":
            return f"`{schema['contentMediaType']}` bytes"
        return {"string": {"binary": "a file", "byte": "base64 text"}.get(schema.get("format"), "string")}.get(
            kind, kind)

    @staticmethod
    def _bounds(schema: dict) -> list[str]:
        said = {"minimum": "at least {}", "exclusiveMinimum": "above {}", "maximum": "at most {}",
                "minLength": "at least {} characters", "maxLength": "at most {} characters",
                "minItems": "at least {} items", "minProperties": "at least {} fields", "pattern": "matching `{}`",
                "format": "{}"}
        return [text.format(schema[key]) for key, text in said.items()
                if key in schema and not (key == "format" and schema[key] in ("binary", "byte"))]

    def resolve(self, node: dict) -> dict:
        """The object a local $ref points to (a JSON pointer into the spec), else the node itself."""
        ref = node.get("$ref")
        if not ref:
            return node
        target = self.spec
        for part in ref.removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return self.resolve(target)
