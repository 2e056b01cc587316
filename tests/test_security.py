"""The security settings, checked on a real TorchServe where they act (docs/security.md): a token on every
API, every port on loopback, no model registration, allowed_urls, weights loaded without unpickling code,
and no request value reaching a shell, a path or eval."""

import ast
import http.server
import ipaddress
import json
import re
import threading

import grpc
import inference_pb2
import inference_pb2_grpc
import management_pb2
import management_pb2_grpc
import psutil
import pytest
import requests
import torch
from google.protobuf import empty_pb2

from conftest import ROOT, SAMPLES, STYLES
from handler_context import make_context
from style_engine import load_features_state_dict
from style_engine.vgg import WeightsError
from style_transfer_handler import StyleTransferHandler

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
integration = pytest.mark.integration


def config_properties() -> dict[str, str]:
    lines = (ROOT / "config.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


# --- tokens -----------------------------------------------------------------------------------------------------

REST_CALLS = [  # every route of both APIs that acts on or reveals something, the destructive ones included
    ("GET", "inference", "/ping"), ("POST", "inference", "/predictions/style_transfer"),
    ("POST", "inference", "/predictions/style_transfer/1.0"), ("POST", "inference", "/explanations/style_transfer"),
    ("POST", "inference", "/v1/models/style_transfer:predict"),
    ("POST", "inference", "/v2/models/style_transfer/infer"),
    ("GET", "management", "/models"), ("GET", "management", "/models/style_transfer"),
    ("PUT", "management", "/models/style_transfer?min_worker=3"), ("DELETE", "management", "/models/style_transfer"),
    ("POST", "management", "/models?url=style_transfer.mar"), ("POST", "management", "/token?type=inference"),
    ("GET", "management", "/workflows"), ("POST", "management", "/workflows?url=x.war"),
    ("POST", "inference", "/wfpredict/x"),
]
OTHER_KEY = {"inference": "management", "management": "inference"}


@integration
@pytest.mark.parametrize("method, api, path", REST_CALLS, ids=[f"{m} {a} {p}" for m, a, p in REST_CALLS])
def test_every_rest_call_needs_its_own_apis_token(server, method, api, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, server.auth(OTHER_KEY[api])):
        response = requests.request(method, server.url(api, path), headers=headers, timeout=30)
        assert response.status_code == 400 and response.json()["type"] == "InvalidKeyException", headers


@integration
def test_only_the_static_api_description_is_open(server):
    # TorchServe serves its OpenAPI description without a token: the same text for every server, naming no
    # model and no key.
    for api in ("inference", "management"):
        description = requests.options(server.url(api, "/"), timeout=30)
        assert description.status_code == 200 and description.json()["info"]["title"] == "TorchServe APIs"
        assert "style_transfer" not in description.text


def grpc_calls(inference_channel, management_channel):
    """(API, call) for every gRPC method that acts on or reveals something; call(metadata) makes the call."""
    inference = inference_pb2_grpc.InferenceAPIsServiceStub(inference_channel)
    management = management_pb2_grpc.ManagementAPIsServiceStub(management_channel)
    request = inference_pb2.PredictionsRequest(model_name="style_transfer", input={"content": CONTENT,
                                                                                     "style": STYLE})
    model = "style_transfer"
    return [
        ("inference", lambda md: inference.Ping(empty_pb2.Empty(), metadata=md, timeout=30)),
        ("inference", lambda md: inference.Predictions(request, metadata=md, timeout=30)),
        ("inference", lambda md: list(inference.StreamPredictions(request, metadata=md, timeout=30))),
        ("management", lambda md: management.ListModels(management_pb2.ListModelsRequest(), metadata=md,
                                                         timeout=30)),
        ("management", lambda md: management.DescribeModel(management_pb2.DescribeModelRequest(model_name=model),
                                                            metadata=md, timeout=30)),
        ("management", lambda md: management.ScaleWorker(
            management_pb2.ScaleWorkerRequest(model_name=model, min_worker=3), metadata=md, timeout=30)),
        ("management", lambda md: management.UnregisterModel(
            management_pb2.UnregisterModelRequest(model_name=model), metadata=md, timeout=30)),
    ]


@integration
def test_every_grpc_call_needs_its_own_apis_token(server):
    workers = server.worker_pids()
    with grpc.insecure_channel(server.grpc_target) as inference_channel, \
            grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_management']}") as management_channel:
        for api, call in grpc_calls(inference_channel, management_channel):
            for metadata in ((), (("authorization", "Bearer wrong"),),
                             (("authorization", f"Bearer {server.key(OTHER_KEY[api])}"),)):
                with pytest.raises(grpc.RpcError) as error:
                    call(metadata)
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, (api, metadata)
    assert server.worker_pids() == workers


# --- where it listens, what it loads ------------------------------------------------------------------------------


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # Java reports ::ffff:127.0.0.1


def test_config_properties_keep_every_address_on_loopback_and_the_guards_on():
    settings = config_properties()
    for name in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", settings[name]), name
    assert settings["grpc_inference_address"] == settings["grpc_management_address"] == "127.0.0.1"
    assert (settings["disable_token_authorization"], settings["enable_model_api"],
            settings["enable_envvars_config"]) == ("false", "false", "false")
    assert int(settings["max_request_size"]) == 64 * 1024 * 1024


@integration
def test_every_listening_socket_is_on_loopback(server):
    # The test instance rewrites the REST addresses (to 127.0.0.1 and free ports), but the gRPC addresses are
    # config.properties' own: this is what a started server really binds.
    launcher = psutil.Process(server.process.pid)
    listening = [connection.laddr for process in (launcher, *launcher.children(recursive=True))
                 for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN]
    assert sorted(address.port for address in listening) == sorted(server.ports.values())
    assert all(is_loopback(address.ip) for address in listening), listening


@integration
def test_model_registration_is_off(server):
    response = requests.post(server.url("management", "/models"), params={"url": "style_transfer.mar"},
                             headers=server.auth("management"), timeout=30)
    assert response.status_code == 405 and response.json()["type"] == "MethodNotAllowedException"
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_management']}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            management_pb2_grpc.ManagementAPIsServiceStub(channel).RegisterModel(
                management_pb2.RegisterModelRequest(url="style_transfer.mar"),
                metadata=(("authorization", f"Bearer {server.key('management')}"),), timeout=30)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED and "Model API disabled" in error.value.details()
    models = requests.get(server.url("management", "/models"), headers=server.auth("management"), timeout=30)
    assert [model["modelName"] for model in models.json()["models"]] == ["style_transfer"]


class CountingHandler(http.server.BaseHTTPRequestHandler):
    """An attacker's file server: it only counts the requests that reach it."""

    requests_seen = 0

    def do_GET(self):
        CountingHandler.requests_seen += 1
        self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def decoy_url():
    """The address of a local HTTP server; the test fails if anything fetched from it."""
    decoy = http.server.HTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=decoy.serve_forever, daemon=True).start()
    CountingHandler.requests_seen = 0
    yield f"http://127.0.0.1:{decoy.server_port}"
    decoy.shutdown()
    decoy.server_close()
    assert CountingHandler.requests_seen == 0, "TorchServe fetched from the decoy"


def assert_url_refused(instance, route: str, url: str, says: str) -> None:
    response = requests.post(instance.url("management", route), params={"url": url},
                             headers=instance.auth("management"), timeout=30)
    assert response.status_code == 404 and says in response.json()["message"], response.text


@integration
def test_allowed_urls_admit_no_model_download_even_with_registration_on(breakable_server, model_store, decoy_url):
    # ShellTorch (CVE-2023-43654) registered a model from an attacker's URL: with the registration API turned
    # on, allowed_urls still refuses any URL outside a model_store directory, before fetching anything.
    assert_url_refused(breakable_server, "/models", f"{decoy_url}/model_store/evil.mar", "does not match any allowed")
    assert_url_refused(breakable_server, "/models", "file:///etc/passwd", "does not match any allowed URL(s)")
    assert_url_refused(breakable_server, "/models", f"file://{model_store}/../../etc/evil.mar",
                       "Relative path is not allowed")
    allowed = config_properties()["allowed_urls"].replace("\\\\", "\\")  # a .properties value escapes "\\"
    assert re.fullmatch(allowed, f"file://{ROOT}/model_store/style_transfer.mar"), "serve.sh's archive stays loadable"


@integration
def test_workflow_registration_stays_open_but_allowed_urls_refuse_every_download(server, decoy_url):
    # enable_model_api=false does not cover TorchServe's workflow API (POST /workflows registers a .war
    # archive, handler code included): with the management key it is answered, and allowed_urls is what
    # keeps an attacker's archive out.
    assert_url_refused(server, "/workflows", f"{decoy_url}/evil.war", "does not match any allowed URL(s)")
    assert_url_refused(server, "/workflows", f"{decoy_url}/model_store/evil.mar", "does not match any allowed")
    assert_url_refused(server, "/workflows", "file:///etc/passwd", "does not match any allowed URL(s)")


class WritesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), as any function could be called."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_weights_that_would_run_code_are_refused_unrun(tmp_path):
    marker = tmp_path / "payload-ran"
    weights = tmp_path / "vgg19_features.pth"
    torch.save({"0.weight": WritesAFile(marker)}, weights)
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_features_state_dict(str(weights))
    with pytest.raises(WeightsError):  # the handler loads the archive's weights the same way
        StyleTransferHandler().initialize(make_context(tmp_path, {"weights": "random"}))
    assert not marker.exists()
    torch.load(weights, weights_only=False)["0.weight"].close()  # the control: the payload is live
    assert marker.exists()


# --- no request value reaches a shell, a path or eval -------------------------------------------------------------

SHELL_MODULES = {"subprocess", "pty", "pickle", "marshal", "shelve", "ctypes"}
DYNAMIC_CODE = {"eval", "exec", "compile", "__import__"}
OS_PROCESS_CALLS = re.compile(r"system|popen|exec.*|spawn.*|fork.*|posix_spawn.*")


def test_the_handler_code_has_no_shell_no_eval_and_only_safe_torch_loads():
    for source in sorted((ROOT / "handler").rglob("*.py")):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not {m.split(".")[0] for m in modules if m} & SHELL_MODULES, (source, modules)
            if not isinstance(node, ast.Call):
                continue
            function = node.func
            assert not (isinstance(function, ast.Name) and function.id in DYNAMIC_CODE), (source, node.lineno)
            if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
                owner, name = function.value.id, function.attr
                assert not (owner == "os" and OS_PROCESS_CALLS.fullmatch(name)), (source, node.lineno)
                if (owner, name) == ("torch", "load"):
                    flags = {k.arg: k.value for k in node.keywords}
                    assert getattr(flags.get("weights_only"), "value", None) is True, (source, node.lineno)


@integration
@pytest.mark.parametrize("params, field", [
    ({"content_layer": "../../../../etc/passwd"}, "content_layer"),
    ({"format": "png; touch {marker}"}, "format"),
    ({"pooling": "$(touch {marker})"}, "pooling"),
    ({"optimizer": "__import__('os').system('touch {marker}')"}, "optimizer"),
    ({"style_layers": {"`touch {marker}`": 1}}, "style_layers.`touch {marker}`"),
    ({"weights_file": "/etc/passwd"}, "weights_file"),
    ({"model_dir": "/tmp"}, "model_dir"),
], ids=["path layer", "shell format", "subshell pooling", "python optimizer", "backticks layer", "weights_file",
        "model_dir"])
def test_path_and_shell_like_values_are_plain_bad_values(server, tmp_path, params, field):
    marker = tmp_path / "ran"
    params = json.loads(json.dumps(params).replace("{marker}", str(marker)))
    response = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                             files={"content": CONTENT, "style": STYLE}, data={"params": json.dumps(params)},
                             timeout=60)
    assert response.status_code == 400 and response.json()["field"] == field.replace("{marker}", str(marker))
    assert not marker.exists()


@integration
def test_part_file_names_are_never_used_as_paths(server, tmp_path):
    written = tmp_path / "written.jpg"
    response = requests.post(
        server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
        files={"content": (f"../../../../../../..{written}", CONTENT, "image/jpeg"),
               "style": (f"$(touch {tmp_path / 'ran'})", STYLE, "image/jpeg")},
        data={"size": "64", "steps": "1"}, timeout=60)
    assert response.status_code == 200
    assert list(tmp_path.iterdir()) == []
