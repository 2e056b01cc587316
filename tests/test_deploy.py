"""deploy/: the Dockerfile linted by hadolint, the Kubernetes manifests validated offline against the schemas
kubernetes-validate ships, the container configurations held to the repository's, and the probes and the auth
proxy run against a real TorchServe and a real nginx.

The Dockerfile cannot be built here (no container engine). KServe's InferenceService is a custom resource with
no schema in kubernetes-validate, and KServe's own SDK (which carries its models) cannot be installed beside our
pinned protobuf: its structure is checked explicitly below, and its container part against Kubernetes' own
Container schema, which KServe's predictor embeds.
"""

import json
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from conftest import ROOT, SAMPLES, STYLES
from local_cluster import CLIENT_TIMEOUT, Hop, find_nginx, render_nginx_conf
from pod_harness import Pod
from pod_images import images_for
from torchserve_instance import TorchServeInstance, free_port, stop_process_group

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
HADOLINT = ROOT / ".venv" / "bin" / "hadolint"
KUBERNETES_VERSIONS = ("1.29", "1.37")  # the oldest with native sidecar containers on by default, the newest
PROBE = DEPLOY / "torchserve_probe.py"
IMAGE_PROBE = "/home/model-server/torchserve_probe.py"  # where deploy/Dockerfile puts it

sys.path.insert(0, str(DEPLOY))
from torchserve_probe import drain, established_connections  # noqa: E402


def documents(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files(folder: Path = K8S, recursive: bool = False) -> list[Path]:
    """The Kubernetes objects' files (kustomization.yaml lists them, and is none)."""
    return sorted(path for path in (folder.rglob("*.yaml") if recursive else folder.glob("*.yaml"))
                  if path.name != "kustomization.yaml")


def manifests() -> dict[str, dict]:
    """The objects applied together (deploy/k8s/*.yaml) by kind (each kind appears once), ConfigMaps by
    "ConfigMap/<name>"."""
    found = {}
    for path in manifest_files():
        for doc in documents(path):
            key = f"ConfigMap/{doc['metadata']['name']}" if doc["kind"] == "ConfigMap" else doc["kind"]
            assert key not in found, f"two {key} objects; the tests expect one"
            found[key] = doc
    return found


def config_maps(objects: dict[str, dict]) -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["data"] for key, doc in objects.items() if key.startswith("ConfigMap/")}


def properties(path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def differing_keys(a: dict, b: dict) -> set[str]:
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


# --- the Dockerfile -------------------------------------------------------------------------------------------

def hadolint(path):
    if not HADOLINT.exists():
        pytest.fail("hadolint is missing from .venv: scripts/setup.sh installs it (requirements.txt)")
    return subprocess.run([str(HADOLINT), "--no-color", "--format", "json", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    lint = hadolint(DOCKERFILE)
    assert (lint.returncode, json.loads(lint.stdout or "[]")) == (0, []), lint.stdout + lint.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    lint = hadolint(bad)
    assert lint.returncode != 0
    assert {"DL3007", "DL3008"} <= {finding["code"] for finding in json.loads(lint.stdout)}


def test_dockerfile_copies_only_files_the_build_context_lets_through():
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in [word for word in line.split()[1:-1] if not word.startswith("--")]:
                assert (ROOT / source).exists(), source
                assert any(source.rstrip("/") == entry or source.startswith(entry + "/") for entry in allowed), source


def test_image_packages_are_pinned_by_requirements():
    install = DOCKERFILE.read_text().split("uv pip install", 1)[1].split("&&", 1)[0]
    packages = [word for word in install.split() if word[0].isalpha()]
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {"torch", "torchserve", "pyyaml"} <= {p.lower() for p in packages}
    assert {p.lower() for p in packages} <= pinned


def test_dockerfile_uses_the_pinned_official_gpu_image_and_never_random_weights():
    text = DOCKERFILE.read_text()
    assert "\nFROM pytorch/torchserve:0.12.0-gpu AS runtime\n" in text
    assert "ARG WEIGHTS=imagenet" in text and "random)" in text and "exit 1" in text


# --- TorchServe configurations --------------------------------------------------------------------------------

def test_container_config_differs_from_the_repository_config_only_where_a_container_needs():
    container, local = properties(DEPLOY / "config.properties"), properties(ROOT / "config.properties")
    assert differing_keys(container, local) == {
        "inference_address", "metrics_address", "grpc_inference_address", "model_store", "metrics_config",
        "allowed_urls", "token_expiration_min", "default_workers_per_model"}
    assert "default_workers_per_model" not in container  # one worker per visible GPU (docs/deployment.md, "Capacity")
    assert container["inference_address"] == "http://0.0.0.0:8080"
    assert container["management_address"].startswith("http://127.0.0.1:")
    assert container["disable_token_authorization"] == "false" and container["enable_model_api"] == "false"
    assert container["allowed_urls"] == "file:///home/model-server/model-store/.*\\\\.mar"


def test_kserve_config_differs_from_the_repository_config_only_where_kserve_needs():
    kserve = properties(DEPLOY / "kserve" / "config" / "config.properties")
    local = properties(ROOT / "config.properties")
    assert differing_keys(kserve, local) == {
        "model_store", "metrics_config", "allowed_urls", "disable_token_authorization", "default_workers_per_model"}
    assert "default_workers_per_model" not in kserve
    assert kserve["model_store"] == "/mnt/models/model-store"  # where KServe puts storageUri's model-store/
    assert all(kserve[key].startswith("http://127.0.0.1:") for key in ("inference_address", "management_address",
                                                                       "metrics_address"))  # behind the proxy
    assert kserve["enable_model_api"] == "false"


@pytest.mark.integration
def test_torchserve_honours_the_container_key_lifetime(model_store, tmp_path):
    minutes = float(properties(DEPLOY / "config.properties")["token_expiration_min"])
    with TorchServeInstance(model_store, tmp_path, {"token_expiration_min": str(minutes)}) as instance:
        keys = json.loads((instance.workdir / "key_file.json").read_text())
    expires = datetime.fromisoformat(keys["inference"]["expiration time"][:19]).replace(tzinfo=timezone.utc)
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() / 60 - minutes) < 10


# --- the probes, against a real TorchServe ---------------------------------------------------------------------

def run_probe(*args):
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.integration
def test_probes_pass_with_the_key_torchserve_wrote(server):
    key_file = str(server.workdir / "key_file.json")
    for check in ("ready", "live"):
        result = run_probe(check, "--url", server.url("inference"), "--key-file", key_file)
        assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_probes_fail_with_a_rejected_key_or_no_server(server, tmp_path):
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "wrongkey"}}))
    for check in ("ready", "live"):
        assert run_probe(check, "--url", server.url("inference"), "--key-file", str(wrong)).returncode == 1
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"
    assert run_probe("live", "--url", nobody, "--key-file", str(server.workdir / "key_file.json")).returncode == 1


def test_drain_waits_for_open_connections_to_close():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        assert established_connections(port) == 1  # the server's end: a request in flight
        assert not drain(port, timeout=0.6, quiet_for=0.2, poll=0.1)
        client.close()
        accepted.close()
        assert established_connections(port) == 0
        assert drain(port, timeout=2, quiet_for=0.2, poll=0.1)


# --- the Kubernetes manifests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(recursive=True), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_manifests_refer_to_each_other():
    objects = manifests()
    deployment, pod = objects["Deployment"], objects["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    containers = {c["name"]: c for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]}
    proxy_ports = {p["name"]: p["containerPort"] for p in containers["auth-proxy"]["ports"]}
    assert objects["Service"]["spec"]["ports"][0]["targetPort"] in proxy_ports
    open_ports = {port["port"] for rule in objects["NetworkPolicy"]["spec"]["ingress"] for port in rule["ports"]}
    assert open_ports == {proxy_ports["http"], int(pod["metadata"]["annotations"]["prometheus.io/port"])}


def test_config_maps_have_what_the_deployment_mounts():
    objects = manifests()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    data = config_maps(objects)
    containers = pod["initContainers"] + pod["containers"]
    for volume in [v for v in pod["volumes"] if "configMap" in v]:
        mounts = [m for c in containers for m in c["volumeMounts"] if m["name"] == volume["name"]]
        assert mounts, volume["name"]
        keys = {m["subPath"] for m in mounts if "subPath" in m} or set(data[volume["configMap"]["name"]])
        assert keys <= set(data[volume["configMap"]["name"]])


def test_torchserve_is_one_gpu_probed_and_drained_by_the_script_in_the_image():
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    (torchserve,) = pod["containers"]
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == 1
    commands = [torchserve[probe]["exec"]["command"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")]
    drain_command = torchserve["lifecycle"]["preStop"]["exec"]["command"]
    assert [c[2] for c in commands] == ["ready", "ready", "live"] and drain_command[2] == "drain"
    assert all(c[1] == IMAGE_PROBE for c in commands + [drain_command])
    assert "deploy/torchserve_probe.py /home/model-server/" in DOCKERFILE.read_text()
    assert float(drain_command[drain_command.index("--timeout") + 1]) < pod["terminationGracePeriodSeconds"]


def test_autoscaler_follows_the_metric_the_adapter_derives_from_torchserve():
    hpa_metric = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (adapter_rules,) = documents(K8S / "monitoring" / "prometheus-adapter-rules.yaml")
    rules = yaml.safe_load(adapter_rules["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == hpa_metric]
    series = rule["seriesQuery"].split("{")[0].strip("'")
    assert f"name: {series}" in (ROOT / "metrics.yaml").read_text()  # TorchServe emits it in Prometheus mode


@pytest.mark.integration
def test_torchserve_serves_the_series_the_autoscaler_uses(server):
    response = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                             files={"content": (SAMPLES / "tubingen.jpg").read_bytes(),
                                    "style": (STYLES / "starry_night.jpg").read_bytes()},
                             data={"size": "64", "steps": "1"}, timeout=120)
    assert response.status_code == 200
    metrics = requests.get(server.url("metrics", "/metrics"), timeout=10).text
    assert 'ts_queue_latency_microseconds{model_name="style_transfer"' in metrics


# --- the auth proxy's nginx configuration ------------------------------------------------------------------------

def auth_proxy_file(name: str) -> str:
    return manifests()["ConfigMap/style-transfer-auth-proxy"]["data"][name]


def test_auth_proxy_template_is_valid_nginx(tmp_path):
    try:
        nginx = find_nginx()
    except SystemExit as missing:  # a failure, not a skip: scripts/test.sh installs nginx
        pytest.fail(str(missing))
    server_block = auth_proxy_file("default.conf.template")
    server_block = server_block.replace("${CLIENT_TOKEN}", "0" * 64)  # what the image's envsubst does
    (tmp_path / "default.conf").write_text(server_block)
    (tmp_path / "nginx.conf").write_text(  # the shape of the nginx image's own nginx.conf
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n    client_body_temp_path {tmp_path}/body;\n"
        f"    proxy_temp_path {tmp_path}/proxy;\n    include {tmp_path}/default.conf;\n}}\n")
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                            "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def declared_waits(conf: str) -> tuple[set[int], set[int]]:
    """The read timeouts an nginx config sets (s) and the client waits it tells the handler (s)."""
    reads = {int(value) for value in re.findall(r"proxy_read_timeout (\d+)s;", conf)}
    told = {int(value) // 1000 for value in re.findall(r"proxy_set_header X-Request-Timeout-Ms (\d+);", conf)}
    assert 'proxy_set_header X-Request-Start "t=$msec";' in conf
    return reads, told


def test_each_proxy_tells_the_handler_how_long_its_clients_wait():
    """What the handler is told (X-Request-Timeout-Ms) is how long the proxy waits (proxy_read_timeout), in the
    pod's auth proxy, in the local cluster's nginx and, for KServe, in Knative in front of the auth proxy;
    longer than TorchServe's responseTimeout, so that no answer TorchServe waits for is cut off."""
    response_timeout = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["responseTimeout"]
    reads, told = declared_waits(auth_proxy_file("default.conf.template"))
    assert len(reads) == 1 and reads == told and min(reads) > response_timeout, (reads, told)
    # the local cluster's nginx takes both from one value: a timeout of its own reaches the handler as it is
    hops = [Hop("instance-1", 20001, "127.0.0.1:21001", "key")]
    assert declared_waits(render_nginx_conf(Path("/tmp"), 20000, "0" * 64, hops, client_timeout=123)) == ({123}, {123})
    assert CLIENT_TIMEOUT > response_timeout
    (auth_proxy_wait,) = declared_waits(auth_proxy_file("default.conf.template"))[0]
    assert inference_service()["spec"]["predictor"]["timeout"] == auth_proxy_wait


# --- the pod, run as the kubelet would run it (tests/support/pod_harness.py) -------------------------------------

def pod_properties() -> dict[str, str]:
    text = manifests()["ConfigMap/style-transfer-torchserve"]["data"]["config.properties"]
    return {key.strip(): value.strip() for key, value in
            (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))}


def test_pod_config_differs_from_the_image_config_only_where_the_pod_design_needs():
    pod, image = pod_properties(), properties(DEPLOY / "config.properties")
    assert differing_keys(pod, image) == {"inference_address", "grpc_inference_address",
                                          "disable_token_authorization", "token_expiration_min"}
    assert pod["inference_address"] == "http://127.0.0.1:8080" and pod["grpc_inference_address"] == "127.0.0.1"
    assert pod["management_address"].startswith("http://127.0.0.1:") and pod["enable_model_api"] == "false"


@pytest.fixture
def pod_root():
    """The pod's files under /tmp, reachable by the containers' users (pytest's own folders are not)."""
    root = Path(tempfile.mkdtemp(prefix="pod-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def deployment_pod(model_store: Path, root: Path, token: str, objects: dict | None = None) -> Pod:
    objects = objects or manifests()
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    return Pod(spec, images_for(spec, model_store / "style_transfer.mar"), config_maps(objects),
               {"style-transfer-token": {"token": token}}, root, name="style-transfer")


def predict(url: str, token: str | None, headers: dict | None = None) -> requests.Response:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    return requests.post(f"{url}/predictions/style_transfer", headers=headers, timeout=120,
                         files={"content": (SAMPLES / "tubingen.jpg").read_bytes()},
                         data={"presets": "starry_night", "size": "32", "steps": "1"})


@pytest.mark.integration
def test_the_deployment_s_pod_serves_through_its_proxy_only_and_survives_a_torchserve_restart(model_store, pod_root):
    """deploy/k8s's pod with its users, groups, volumes, mounts and read-only roots: its probes pass, the proxy
    answers with the Secret's token and refuses without it, TorchServe is out of reach from outside the pod,
    and a restarted TorchServe is served through the same proxy, which is not restarted."""
    token = secrets.token_hex(32)
    with deployment_pod(model_store, pod_root, token) as pod:
        proxy, torchserve = pod.containers["auth-proxy"], pod.containers["torchserve"]
        assert (proxy.uid, torchserve.uid) == (101, 1000)  # the manifest's users, as the kubelet applies them
        for attempt in range(2):  # as started, then after TorchServe restarts
            torchserve.wait_for("startupProbe", timeout=180)
            assert torchserve.probe("readinessProbe") and torchserve.probe("livenessProbe")
            proxy.wait_for("readinessProbe", timeout=30)
            port = proxy.port("http")
            answer = predict(pod.url(port), token)
            assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png", answer.text
            assert predict(pod.url(port), None).status_code == 401
            assert predict(pod.url(port), token + "x").status_code == 401
            if attempt == 0:
                # the proxy sets when a request arrived and how long its client waits: a client's own say is
                # replaced (the handler would drop a request that claims to have waited since 1970)
                forged = {"X-Request-Start": "t=1", "X-Request-Timeout-Ms": "1"}
                assert predict(pod.url(port), token, forged).status_code == 200
                check_the_description_is_all_the_token_reaches_of_management(pod.url(port), token, pod_root)
                for torchserve_port in (8080, 8081, 7070):  # loopback only: the proxy is the one door
                    with pytest.raises(requests.ConnectionError):
                        requests.get(pod.url(torchserve_port, "/ping"), timeout=5)
                written = torchserve.exec(["sh", "-c", "touch /home/model-server/x || echo read-only"])
                assert "read-only" in written.stdout  # readOnlyRootFilesystem: only the mounts are writable
                torchserve.restart()
        assert proxy.restarts == 0 and torchserve.restarts == 1


def check_the_description_is_all_the_token_reaches_of_management(url: str, token: str, root: Path) -> None:
    """Through the proxy, with the client token: the model's description (GET, customized=true or no query),
    and nothing else of the management API; the playground runs on that token alone (docs/playground.md)."""
    auth = {"Authorization": f"Bearer {token}"}
    described = requests.get(f"{url}/models/style_transfer?customized=true", headers=auth, timeout=60)
    assert described.status_code == 200, described.text
    assert described.json()[0]["customizedMetadata"]["presets"]
    assert requests.get(f"{url}/models/style_transfer", headers=auth, timeout=60).status_code == 200
    assert requests.get(f"{url}/models/style_transfer?customized=true", timeout=10).status_code == 401
    refused = {(method, path): requests.request(method, url + path, headers=auth, timeout=10).status_code
               for method, path in [("DELETE", "/models/style_transfer"), ("PUT", "/models/style_transfer"),
                                    ("PUT", "/models/style_transfer?min_worker=0"),
                                    ("POST", "/models/style_transfer"), ("GET", "/models"),
                                    ("GET", "/models/style_transfer?customized=true&x=1"),
                                    ("GET", "/models/style_transfer/1.0"), ("POST", "/models?url=x.mar"),
                                    ("GET", "/metrics"), ("POST", "/token?type=management")]}
    assert refused == {**{key: 404 for key in refused}, ("DELETE", "/models/style_transfer"): 405,
                       ("PUT", "/models/style_transfer"): 405,
                       ("PUT", "/models/style_transfer?min_worker=0"): 405,
                       ("POST", "/models/style_transfer"): 405}, refused
    (root / "token").write_text(token + "\n")
    port = free_port()
    playground = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "playground.py"), "--listen", f"127.0.0.1:{port}", "--inference", url,
         "--inference-token-file", str(root / "token"), "--jobs", "off",  # the pod alone: no jobs service
         "--prefix", str(root / "playground"), "--wait", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline, status = time.monotonic() + 30, None
        while status != 200 and playground.poll() is None and time.monotonic() < deadline:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/description", timeout=10).status_code
            except requests.ConnectionError:
                time.sleep(0.2)
        assert status == 200, playground.stderr.read() if playground.poll() is not None else status
    finally:
        stop_process_group(playground)


@pytest.mark.parametrize("removed", [None, "/tmp", "/etc/nginx/conf.d"])
def test_the_proxy_starts_with_its_mounts_and_not_without_them(removed, pod_root):
    """The sidecar alone, as it starts before TorchServe: with the manifest's mounts it serves its port as uid 101
    under its read-only root (502: no TorchServe yet); without the emptyDir for its temporary files it exits,
    without the one its entrypoint writes the filled template to it serves nothing."""
    objects = manifests()
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    (proxy,) = spec["initContainers"]
    proxy["volumeMounts"] = [m for m in proxy["volumeMounts"] if m["mountPath"] != removed]
    pod = Pod({**spec, "containers": []}, images_for(spec, Path("/nonexistent")), config_maps(objects),
              {"style-transfer-token": {"token": "0" * 64}}, pod_root)
    with pod:
        sidecar = pod.containers["auth-proxy"]
        deadline = time.monotonic() + 10
        while sidecar.running() and time.monotonic() < deadline and "start worker" not in sidecar.log():
            time.sleep(0.1)
        try:
            status = requests.get(pod.url(sidecar.port("http"), "/ping"), timeout=5).status_code
        except requests.ConnectionError:
            status = None
        assert (status if sidecar.running() else None) == (502 if removed is None else None), sidecar.log()


# --- KServe -----------------------------------------------------------------------------------------------------

def kubernetes_schema_validator(definition: str, version: str = KUBERNETES_VERSIONS[-1]):
    directory = f"kubernetes-json-schema/v{version}.0-local-strict"
    definitions = schema_contents(f"{directory}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{definition}"}, registry=registry)


def inference_service() -> dict:
    (service,) = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    return service


def test_inference_service_has_kserve_s_structure():
    service = inference_service()
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert service["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    assert service["metadata"]["annotations"]["serving.kserve.io/enable-metric-aggregation"] == "true"
    predictor = service["spec"]["predictor"]
    # ComponentExtensionSpec fields of KServe's v1beta1 PredictorSpec that we set, with their types, and the
    # PodSpec it embeds
    scaling = {"containerConcurrency", "scaleMetric", "scaleTarget", "minReplicas", "maxReplicas", "timeout"}
    assert set(predictor) == scaling | {"securityContext", "containers", "volumes"}
    assert predictor["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    assert all(isinstance(predictor[key], int) for key in scaling - {"scaleMetric"})
    assert predictor["containerConcurrency"] == 1  # one optimisation at a time per GPU worker
    assert predictor["timeout"] >= 300  # TorchServe's responseTimeout (handler/model-config.yaml)
    assert all(isinstance(value, str) for value in service["metadata"]["annotations"].values())


def test_inference_service_predictor_is_a_valid_pod_serving_kserve_s_layout():
    predictor = inference_service()["spec"]["predictor"]
    pod = {key: value for key, value in predictor.items() if key in ("securityContext", "containers", "volumes")}
    kubernetes_schema_validator("io.k8s.api.core.v1.PodSpec").validate(pod)
    torchserve, proxy = predictor["containers"]
    assert torchserve["name"] == "kserve-container"  # where KServe's storage initializer puts storageUri
    storage = next(item["value"] for item in torchserve["env"] if item["name"] == "STORAGE_URI")
    assert storage.split("://")[0] in ("s3", "gs", "pvc", "https", "hf", "oci", "azure")
    assert "/mnt/models/config/config.properties" in torchserve["command"]  # storageUri's config/config.properties
    assert torchserve["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert [c for c in predictor["containers"] if c.get("ports")] == [proxy]  # Knative routes to one port: the proxy


@pytest.mark.integration
def test_the_inference_service_s_pod_is_authenticated_and_serves_through_its_proxy_only(model_store, pod_root):
    """The InferenceService's predictor as a pod, with /mnt/models as KServe's storage initializer fills it:
    200 with the Secret's token, 401 without, and nothing of TorchServe (inference, metrics) reachable from
    outside the pod."""
    provisioned = pod_root / "mnt-models"
    (provisioned / "model-store").mkdir(parents=True)
    (provisioned / "config").mkdir()
    shutil.copy(model_store / "style_transfer.mar", provisioned / "model-store")
    shutil.copy(DEPLOY / "kserve" / "config" / "config.properties", provisioned / "config")
    predictor = inference_service()["spec"]["predictor"]
    spec = {**predictor, "volumes": [*predictor["volumes"], {"name": "kserve-provision-location",
                                                               "hostPath": {"path": str(provisioned)}}]}
    torchserve = {**spec["containers"][0]}
    torchserve["volumeMounts"] = [*torchserve["volumeMounts"], {"name": "kserve-provision-location",
                                                                "mountPath": "/mnt/models", "readOnly": True}]
    spec["containers"] = [torchserve, spec["containers"][1]]
    token = secrets.token_hex(32)
    pod = Pod(spec, images_for(spec, model_store / "style_transfer.mar"), config_maps(manifests()),
              {"style-transfer-token": {"token": token}}, pod_root / "pod", name="style-transfer-predictor")
    with pod:
        proxy = pod.containers["auth-proxy"]
        proxy.wait_for("readinessProbe", timeout=180)
        answer = predict(pod.url(8000), token)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "image/png", answer.text
        assert predict(pod.url(8000), None).status_code == 401
        for port in (8080, 8081, 8082, 7070):
            with pytest.raises(requests.ConnectionError):
                requests.get(pod.url(port, "/ping"), timeout=5)
