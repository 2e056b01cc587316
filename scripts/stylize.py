#!/usr/bin/env python3
"""Stylise CONTENT with style images and presets and write the result to -o OUT; or list the presets.

    python scripts/stylize.py content.jpg style.jpg -o out.png --url http://127.0.0.1:8080 --size 512 --steps 300
    python scripts/stylize.py content.jpg style.jpg -o out.png --grpc 127.0.0.1:7070
    python scripts/stylize.py content.jpg style.jpg -o out.png --local --weights imagenet --json
    python scripts/stylize.py content.jpg -o out.png --url http://127.0.0.1:8080 --preset starry_night
    python scripts/stylize.py content.jpg a.jpg --preset shipwreck --mask sky.png --mask town.png -o out.png ...
    python scripts/stylize.py --list-presets [--management http://127.0.0.1:8081]
    python scripts/stylize.py content.jpg style.jpg -o out.png --async [--jobs-url http://127.0.0.1:8070]
    python scripts/stylize.py -o out.png --async --job JOB_ID          (resume: watch and fetch a job)
    python scripts/stylize.py --async --job JOB_ID --cancel            (stop it)

--url calls the REST API and streams progress (--no-stream turns that off); --grpc calls gRPC StreamPredictions
(TorchServe 0.12 cannot stream progress over gRPC, so the bar only shows that it waits); --local runs the engine
in this process, its presets read from --styles (default samples/styles/, as build_mar.py packs them). The
styles are the STYLE files, then the --preset names, in order; --mask files pair with them in that order
(docs/creative-controls.md); --init-image starts from that image (init=image). The token comes from --token,
else from --key-file (TorchServe's key_file.json).
Every request parameter has a flag of its own (docs/parameters.md): --size 512 --steps 300 --style-weight 1e5;
--set key=value sets one by its name, for scripts. Values are read as JSON where they parse (`--style-blend
'[1,0]'`, `--set size=64`) and as text otherwise; the server (or, with --local, the engine) checks them. A
progress bar goes to stderr; --json prints the result's fields (those of `response=json`, without the image)
to stdout.
--list-presets prints each preset's name and size: from the server's model description (the management API,
--management, with the management token from --management-token or --key-file), or with --local from
--styles; with --json as a JSON list. Exit status 0 on success; 1 when the request is refused (the server's
error is printed as it came) or the server cannot be reached; 2 on a usage error.
--async submits the request to the jobs service (--jobs-url, token from --token or --jobs-token-file) and
follows the job's events with the progress bar, then fetches the result. The job runs on the server whatever
the client does: Ctrl-C stops only the client (exit status 130) and prints the job's id; --job ID watches that
job again and fetches its result, --cancel stops it on the server.
"""

import argparse
import base64
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handler"))

from style_engine import RequestError, VGGFeatures, WeightsError, load_features_state_dict, parse_params, stylize  # noqa: E402
from style_engine.api import result_fields  # noqa: E402
from style_engine.codec import encode_image, load_image_file, load_mask_file  # noqa: E402
from style_engine.params import describe_params  # noqa: E402
from style_engine.presets import PresetLibrary  # noqa: E402

MODEL_NAME = "style_transfer"
PROJECT_STYLES = Path(__file__).resolve().parent.parent / "samples" / "styles"  # build_mar.py's default
# The request parameters the client sets itself, and the option that decides each instead of a flag of its own.
SET_BY_THE_CLIENT = {"presets": "--preset", "response": "--json", "stream": "--no-stream"}


class Refused(Exception):
    """The server refused the request or could not be reached; the message is what to print."""


def main(argv: list[str] | None = None) -> int:
    parser = _arguments()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    try:
        if args.list_presets:
            _print_presets(_presets_local(args) if args.local else _presets_of_server(args), args.json)
            return 0
        if args.async_ and args.cancel:
            print(json.dumps(_cancel_job(args)))
            return 0
        run = _run_async if args.async_ else _run_local if args.local else _run_rest if args.url else _run_grpc
        image, fields = run(args, _request_params(args))
    except (RequestError, WeightsError, OSError) as error:  # OSError: an input file that cannot be read
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Refused as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.async_ and args.job:
            print(f"stopped watching; job {args.job} goes on: resume with --async --job {args.job} -o OUT, "
                  f"or stop it with --async --job {args.job} --cancel", file=sys.stderr)
        return 130
    Path(args.output).write_bytes(image)
    if args.json:
        print(json.dumps(fields))
    return 0


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("content", nargs="?", help="content image file")
    parser.add_argument("styles", nargs="*", metavar="style", help="style image file(s); none where presets are "
                                                                   "given")
    parser.add_argument("-o", "--output", help="where to write the stylised image")
    parser.add_argument("--preset", action="append", default=[], metavar="NAME", dest="presets",
                        help="a preset style of the server (or of --styles with --local), after the STYLE files")
    parser.add_argument("--mask", action="append", default=[], metavar="FILE", dest="masks",
                        help="where the next style applies (white: fully), paired with the styles in order")
    parser.add_argument("--init-image", metavar="FILE", help="start from this image (init=image)")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    parser.add_argument("--management", default="http://127.0.0.1:8081", metavar="URL",
                        help="with --list-presets: TorchServe management address (default: %(default)s)")
    parser.add_argument("--management-token", metavar="TOKEN", help="management token (default: read from --key-file)")
    parser.add_argument("--styles", default=str(PROJECT_STYLES), dest="styles_dir", metavar="DIR",
                        help="with --local: directory of the presets (default: the project's samples/styles/)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="TorchServe inference address, e.g. http://127.0.0.1:8080")
    where.add_argument("--grpc", metavar="HOST:PORT", help="TorchServe gRPC inference address, e.g. 127.0.0.1:7070")
    where.add_argument("--local", action="store_true", help="run the engine in this process")
    parser.add_argument("--token", help="inference token (default: read from --key-file)")
    parser.add_argument("--key-file", default="key_file.json", help="TorchServe's key_file.json (default: ./)")
    parser.add_argument("--no-stream", action="store_true", help="with --url: one response, no progress")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--weights", default="imagenet", help="with --local: imagenet, random or a state dict path")
    parser.add_argument("--device", default=None, help="with --local: torch device (default: cuda if available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a request parameter by its name, as JSON or text (for scripts; the flags below "
                             "are the same)")
    parser.add_argument("--json", action="store_true", help="print the result's fields as JSON to stdout")
    _add_parameter_flags(parser)
    jobs = parser.add_argument_group("jobs (--async)")
    jobs.add_argument("--async", action="store_true", dest="async_",
                      help="submit to the jobs service and follow the job (it goes on if the client stops)")
    jobs.add_argument("--jobs-url", default="http://127.0.0.1:8070", metavar="URL",
                      help="the jobs service (default: %(default)s, scripts/serve.sh's)")
    jobs.add_argument("--jobs-token-file", default="jobs_token", metavar="FILE",
                      help="the jobs service's token, unless --token gives it (default: ./jobs_token)")
    jobs.add_argument("--job", metavar="ID", help="with --async: a job submitted before: watch it and fetch its result")
    jobs.add_argument("--cancel", action="store_true", help="with --async --job ID: cancel that job")
    return parser


def _add_parameter_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every request parameter (--style-weight for style_weight), from the engine's own description:
    its meaning, what is allowed and the default. The values go to the server as they are written."""
    group = parser.add_argument_group("request parameters (a server may set other defaults and lower maxima)")
    for param in describe_params():
        if param["name"] in SET_BY_THE_CLIENT:
            continue
        help_text = f"{param['doc']}: {param['allowed']}; default {json.dumps(param['default'])}"
        flag, dest = "--" + param["name"].replace("_", "-"), _parameter_dest(param["name"])
        if param["schema"].get("type") == "boolean":
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=dest, metavar=_metavar(param["schema"]), help=help_text)


def _parameter_dest(name: str) -> str:
    return f"parameter_{name}"


def _metavar(schema: dict) -> str:
    kinds = schema.get("type", "string")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    options = [option for option in schema.get("enum", []) if isinstance(option, str)]
    if options:  # a few choices are listed; a VGG19 layer's many names are in the help text
        return "{" + ",".join(options) + "}" if len(options) <= 4 else "NAME"
    if {"array", "object"} & set(kinds) or "anyOf" in schema:
        return "JSON"
    return "N" if {"integer", "number"} & set(kinds) else "TEXT"


def _parameter_flags(args) -> dict:
    """The parameters given by their own flags: name -> the value as written."""
    return {param["name"]: getattr(args, _parameter_dest(param["name"])) for param in describe_params()
            if getattr(args, _parameter_dest(param["name"]), None) is not None}


def _check_usage(parser: argparse.ArgumentParser, args) -> None:
    """What argparse alone cannot say; exits with status 2 like argparse."""
    twice = sorted(set(_parameter_flags(args)) & {pair.partition("=")[0] for pair in args.set})
    if twice:
        parser.error(f"{twice[0]} is given twice: by --{twice[0].replace('_', '-')} and by --set")
    if args.list_presets:
        if args.url or args.grpc:
            parser.error("--list-presets asks the management API (--management) or, with --local, --styles")
        return
    if args.async_:
        if args.url or args.grpc or args.local:
            parser.error("--async talks to the jobs service (--jobs-url), not --url, --grpc or --local")
        if args.cancel and not args.job:
            parser.error("--cancel needs --job ID")
        if not args.cancel and not args.output:
            parser.error("-o OUT is required")
        if args.job or args.cancel:
            return
        if not args.content:
            parser.error("CONTENT is required, unless --job ID resumes a job")
    elif args.job or args.cancel:
        parser.error("--job and --cancel go with --async")
    elif not (args.content and args.output and (args.url or args.grpc or args.local)):
        parser.error("CONTENT, -o OUT and one of --url, --grpc or --local are required")
    if not (args.styles or args.presets):
        parser.error("give at least one style: a STYLE file or --preset NAME")


def _request_params(args) -> dict:
    """The request's parameters: their flags and --set, with the presets and init=image that --preset and
    --init-image ask for."""
    params = _settings(args.set)
    params.update({name: value if isinstance(value, bool) else _json_or_text(value)
                   for name, value in _parameter_flags(args).items()})
    if args.presets:
        params["presets"] = args.presets
    if args.init_image:
        params.setdefault("init", "image")
    return params


def _settings(pairs: list[str]) -> dict:
    """--set key=value pairs as a params object; values are JSON where they parse, text otherwise."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RequestError("params", f"--set takes KEY=VALUE; got {pair!r}")
        params[key] = _json_or_text(value)
    return params


def _json_or_text(value: str):
    """A value from the command line: JSON where it parses (numbers, lists, objects, true), else the text."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _run_local(args, raw_params: dict) -> tuple[bytes, dict]:
    import torch
    from tqdm import tqdm

    style_params, output_params = parse_params(raw_params)
    content = load_image_file(args.content)
    styles = [load_image_file(path) for path in args.styles]
    styles += PresetLibrary.load(Path(args.styles_dir)).images(style_params.presets)
    masks = [load_mask_file(path) for path in args.masks]
    init_image = load_image_file(args.init_image) if args.init_image else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.weights == "random":
        print("warning: random VGG19 weights: for tests only, the result shows no real style", file=sys.stderr)
    extractor = VGGFeatures(load_features_state_dict(args.weights)).to(device)
    with tqdm(total=style_params.steps, unit="step", file=sys.stderr, leave=False) as bar:
        def show(progress):
            _advance(bar, progress.step, progress.steps, progress.loss["total"], progress.scale, progress.scales)
        result = stylize(extractor, content, styles, style_params, masks=masks, init_image=init_image,
                         callback=show)
    image = encode_image(result.image, output_params.format, output_params.quality)
    return image, result_fields(result, output_params.format)


def _advance(bar, step: int, steps: int, loss: float, scale: int, scales: int) -> None:
    bar.total = steps
    bar.update(step - bar.n)
    bar.set_postfix(loss=f"{loss:.4g}", scale=f"{scale}/{scales}")


def _parts(args, params: dict) -> dict[str, bytes]:
    """The request's parts as the API names them: content, style, style_2, ..., mask_1, ..., init_image,
    params (JSON)."""
    parts = {"content": Path(args.content).read_bytes()}
    for i, path in enumerate(args.styles):
        parts["style" if i == 0 else f"style_{i + 1}"] = Path(path).read_bytes()
    for i, path in enumerate(args.masks):
        parts[f"mask_{i + 1}"] = Path(path).read_bytes()
    if args.init_image:
        parts["init_image"] = Path(args.init_image).read_bytes()
    parts["params"] = json.dumps(params).encode()
    return parts


def _token(args, kind: str = "inference") -> str | None:
    """The `kind` token ("inference" or "management"): given on the command line, else from the key file."""
    given = args.token if kind == "inference" else args.management_token
    if given:
        return given
    try:
        return json.loads(Path(args.key_file).read_text())[kind]["key"]
    except (OSError, ValueError, KeyError):
        return None  # the server will say that a token is needed


def _presets_local(args) -> list[dict]:
    return PresetLibrary.load(Path(args.styles_dir)).describe()


def _presets_of_server(args) -> list[dict]:
    """The presets in the server's model description (GET /models/style_transfer?customized=true)."""
    import requests

    token = _token(args, "management")
    url = f"{args.management.rstrip('/')}/models/{MODEL_NAME}?customized=true"
    try:
        response = requests.get(url, headers={"Authorization": f"Bearer {token}"} if token else {},
                                timeout=args.timeout)
    except requests.RequestException as error:
        raise Refused(f"error: cannot reach {url}: {error}") from None
    if response.status_code != 200:
        raise Refused(response.text)
    return response.json()[0]["customizedMetadata"]["presets"]


def _print_presets(presets: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(presets))
        return
    for preset in presets:
        print(f"{preset['name']}\t{preset['width']}x{preset['height']}")


def _run_rest(args, params: dict) -> tuple[bytes, dict]:
    import requests

    params = {**params, "stream": not args.no_stream, "response": "json"}
    token = _token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{args.url.rstrip('/')}/predictions/{MODEL_NAME}"
    try:
        response = requests.post(url, headers=headers, files=_parts(args, params), stream=True, timeout=args.timeout)
        if response.status_code != 200:
            raise Refused(response.text)
        lines = response.iter_lines() if params["stream"] else [response.content]
        return _read_events(lines, params.get("steps"))
    except requests.RequestException as error:
        raise Refused(f"error: cannot reach {url}: {error}") from None


def _read_events(lines, steps) -> tuple[bytes, dict]:
    """Follow JSON lines (progress..., then done or error) with a progress bar; a plain JSON body is `done`."""
    from tqdm import tqdm

    with tqdm(total=steps, unit="step", file=sys.stderr, leave=False) as bar:
        for line in lines:
            if not line:
                continue
            event = json.loads(line)
            kind = event.get("event", "done")
            if kind == "progress":
                _advance(bar, event["step"], event["steps"], event["loss"]["total"], event["scale"], event["scales"])
            elif kind == "error":
                raise Refused(json.dumps({k: v for k, v in event.items() if k != "event"}))
            else:
                return _image_and_fields(event)
    raise Refused("error: the server closed the stream without a result")


def _image_and_fields(done: dict) -> tuple[bytes, dict]:
    fields = {key: value for key, value in done.items() if key not in ("event", "image")}
    return base64.b64decode(done["image"]), fields


def _run_grpc(args, params: dict) -> tuple[bytes, dict]:
    import grpc
    from tqdm import tqdm

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proto" / "gen"))
    import inference_pb2
    import inference_pb2_grpc

    token = _token(args)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    request = inference_pb2.PredictionsRequest(model_name=MODEL_NAME,
                                               input=_parts(args, {**params, "response": "json"}))
    with grpc.insecure_channel(args.grpc) as channel, tqdm(unit="s", file=sys.stderr, leave=False) as bar:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        try:
            # StreamPredictions: our handler sends one message, the result (see --help for why no progress)
            replies = list(stub.StreamPredictions(request, metadata=metadata, timeout=args.timeout))
        except grpc.RpcError as error:
            # TorchServe appends its exception's class name after our JSON error, on a line of its own
            raise Refused((error.details() or str(error.code())).split("\n")[0]) from None
        bar.update()
    if not replies:
        raise Refused("error: the server closed the stream without a result")
    return _image_and_fields(json.loads(replies[-1].prediction))


def _jobs_headers(args) -> dict[str, str]:
    token = args.token
    if not token:
        try:
            token = Path(args.jobs_token_file).read_text().strip()
        except OSError:
            token = None  # the service will say that a token is needed
    return {"Authorization": f"Bearer {token}"} if token else {}


def _jobs_call(method: str, args, path: str, **kwargs):
    import requests

    url = f"{args.jobs_url.rstrip('/')}{path}"
    try:
        response = requests.request(method, url, headers={**_jobs_headers(args), **kwargs.pop("headers", {})},
                                    timeout=kwargs.pop("timeout", 60), **kwargs)
    except requests.RequestException as error:
        raise Refused(f"error: cannot reach {url}: {error}") from None
    if response.status_code >= 400:
        raise Refused(response.text)
    return response


def _run_async(args, params: dict) -> tuple[bytes, dict]:
    """Submit (unless --job names a job), follow the events, fetch the result."""
    import uuid

    if not args.job:
        # the same key if this submit is sent again: a network error never makes two jobs
        submitted = _jobs_call("POST", args, "/jobs", files=_parts(args, {**params, "response": "json"}),
                               headers={"Idempotency-Key": uuid.uuid4().hex})
        args.job = submitted.json()["id"]
        print(f"job {args.job}", file=sys.stderr)
    _follow(args, params.get("steps"))
    result = _jobs_call("GET", args, f"/jobs/{args.job}/result")
    if result.headers.get("Content-Type", "").startswith("application/json"):
        return _image_and_fields(result.json())
    return result.content, {}  # submitted by another client without response=json


def _follow(args, steps) -> None:
    """The job's events with a progress bar until it ends; a dropped connection is resumed where it stopped."""
    from tqdm import tqdm

    last_id, tries, reconnect = None, 0, {"retry": 1000}
    with tqdm(total=steps, unit="step", file=sys.stderr, leave=False) as bar:
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with _jobs_call("GET", args, f"/jobs/{args.job}/events", headers=headers, stream=True,
                                timeout=(10, 120)) as response:
                    for event_id, name, data in _server_sent_events(response.iter_lines(decode_unicode=True),
                                                                    reconnect):
                        last_id, tries = event_id, 0
                        if name == "progress":
                            _advance(bar, data["step"], data["steps"], data["loss"]["total"], data["scale"],
                                     data["scales"])
                        elif name == "done":
                            return
                        elif name == "error":
                            raise Refused(json.dumps(data))
                        elif name == "canceled":
                            raise Refused(f"error: job {args.job} was canceled")
            except Refused as error:
                if "cannot reach" not in str(error) or tries >= 5:
                    raise
            except OSError:  # the connection dropped mid-stream
                if tries >= 5:
                    raise Refused(f"error: lost the events of job {args.job}") from None
            tries += 1
            time.sleep(reconnect["retry"] / 1000)  # a stream ends after a while: back when the service says


def _server_sent_events(lines, reconnect: dict):
    """(id, event, data) of each server-sent event; comments (keep-alives) skipped; a `retry:` field (ms before
    reconnecting) put into `reconnect`."""
    fields = {}
    for line in lines:
        if line:
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
            continue
        if fields.get("retry", "").isdigit():
            reconnect["retry"] = int(fields["retry"])
        if "event" in fields:
            yield fields.get("id"), fields["event"], json.loads(fields.get("data", "{}"))
        fields = {}


def _cancel_job(args) -> dict:
    return _jobs_call("POST", args, f"/jobs/{args.job}/cancel").json()


if __name__ == "__main__":
    sys.exit(main())
