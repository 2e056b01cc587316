"""The jobs service's deployment pieces: its image, its Kubernetes objects (validated against the schemas with
the other manifests by tests/test_deploy.py, which reads deploy/k8s/ recursively), and that they fit together
with the style-transfer objects and with what the service really serves."""

import ast
import dataclasses
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

from conftest import ROOT
from jobs.api import METRICS
from jobs.config import JobsConfig
from jobs.store import SAFE_EVICTION_POLICY

DEPLOY = ROOT / "deploy"
JOBS_K8S = DEPLOY / "k8s" / "jobs"
WITH_JOBS = DEPLOY / "k8s-with-jobs"


def objects(path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


# Imports the jobs service with torch, torchvision and TorchServe impossible to import, as in its image, and
# prints the repository's files it loaded.
WITHOUT_TORCH = """
import json, sys
from pathlib import Path
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "ts"):
            raise ImportError(name + " is not in the jobs service's image")
sys.meta_path.insert(0, NoTorch())
import jobs.__main__
root = Path.cwd()
print(json.dumps(sorted(str(Path(module.__file__).relative_to(root)) for module in list(sys.modules.values())
                        if getattr(module, "__file__", None) and Path(module.__file__).is_relative_to(root)
                        and ".venv" not in Path(module.__file__).parts)))
"""


def test_the_jobs_service_needs_no_torch_and_its_image_copies_what_it_imports():
    """Its submit checks run the handler's own request parsing, which imports no torch: the image holds those
    modules beside jobs/, and installs (pinned) every package they and the service import."""
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    loaded = set(json.loads(run.stdout))
    dockerfile = (DEPLOY / "Dockerfile.jobs").read_text()
    copied = [source for line in re.findall(r"^COPY ((?:.*\\\n)*.*)$", dockerfile, re.MULTILINE)
              for source in line.replace("\\\n", " ").split()[:-1] if not source.startswith("--")]
    in_image = {str(path.relative_to(ROOT)) for source in copied for path in
                ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*.py"))}
    assert loaded <= in_image, loaded - in_image
    allowed = [line[1:] for line in (DEPLOY / "Dockerfile.jobs.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(allowed) == sorted(copied)  # the build context holds what is copied, nothing more
    # what each module imports when it is imported (not in a function, not only for type checkers)
    imported = {node.names[0].name.split(".")[0] if isinstance(node, ast.Import) else (node.module or "").split(".")[0]
                for name in loaded for node in ast.parse((ROOT / name).read_text()).body
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)}
    distributions = importlib.metadata.packages_distributions()
    needed = {dist.lower() for module in imported for dist in distributions.get(module, [])}
    packages = dockerfile.split("--constraint /tmp/requirements.txt")[1].split("\\")[0].split()
    assert needed <= set(packages), needed - set(packages)
    pinned = {line.split("==")[0] for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    assert set(packages) <= pinned  # every package the image installs has its version in requirements.txt


def test_the_jobs_image_passes_hadolint():
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "hadolint"), "--no-color", str(DEPLOY / "Dockerfile.jobs")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_jobs_objects_refer_to_each_other_and_to_the_style_transfer_ones():
    jobs, redis = objects(JOBS_K8S / "jobs.yaml"), objects(JOBS_K8S / "redis.yaml")
    pod = jobs["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert jobs["Service"]["spec"]["selector"].items() <= labels.items()
    assert jobs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert env["STYLE_JOBS_LISTEN"]["value"] == f"0.0.0.0:{ports['http']}"
    assert env["STYLE_JOBS_METRICS_LISTEN"]["value"] == f"0.0.0.0:{ports['metrics']}"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    # the clients' tokens and the webhooks' secret: files of one Secret, mounted where the settings name them
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    secrets = {volume["name"]: volume["secret"]["secretName"] for volume in pod["spec"]["volumes"]}
    for setting in ("STYLE_JOBS_TOKEN_FILE", "STYLE_JOBS_WEBHOOK_SECRET_FILE"):
        folder, name = env[setting]["value"].rsplit("/", 1)
        (volume,) = [volume for volume, path in mounts.items() if path == folder]
        assert secrets[volume] == "style-transfer-jobs" and name in ("tokens", "webhook-secret")
    assert env["STYLE_JOBS_TORCHSERVE_TOKEN_FILE"]["value"].rsplit("/", 1)[0] in mounts.values()
    # the bucket, and its credentials from an optional Secret (a pod's role serves as well)
    assert env["STYLE_JOBS_OBJECT_STORE"]["value"].startswith("s3://")
    assert container["envFrom"] == [{"secretRef": {"name": "style-transfer-jobs-s3", "optional": True}}]
    assert redis["Service"]["spec"]["selector"].items() <= redis["StatefulSet"]["spec"]["template"]["metadata"][
        "labels"].items()
    style_transfer = objects(DEPLOY / "k8s" / "deployment.yaml")["Deployment"]
    (torchserve,) = style_transfer["spec"]["template"]["spec"]["containers"]
    worker_redis = {item["name"]: item for item in torchserve["env"]}["STYLE_JOBS_REDIS_URL"]["valueFrom"]
    assert worker_redis["secretKeyRef"] == {**env["STYLE_JOBS_REDIS_URL"]["valueFrom"]["secretKeyRef"],
                                            "optional": True}  # the one Redis URL, from the one Secret
    service = objects(DEPLOY / "k8s" / "service.yaml")["Service"]
    assert env["STYLE_JOBS_TORCHSERVE_URL"]["value"] == f"http://{service['metadata']['name']}"
    allowed = redis["NetworkPolicy"]["spec"]["ingress"][0]["from"]
    assert [peer["podSelector"]["matchLabels"] for peer in allowed] == [
        labels, style_transfer["spec"]["template"]["metadata"]["labels"]]
    # the API open, the metrics (which take no token here) to the monitoring namespace alone
    api, monitoring = jobs["NetworkPolicy"]["spec"]["ingress"]
    assert jobs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert [port["port"] for port in api["ports"]] == [ports["http"]] and "from" not in api
    assert [port["port"] for port in monitoring["ports"]] == [ports["metrics"]]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def kustomization(folder) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def test_each_kustomization_holds_every_manifest_of_its_folder():
    for folder in (DEPLOY / "k8s", JOBS_K8S):
        listed = set(kustomization(folder)["resources"])
        assert listed == {path.name for path in folder.glob("*.yaml") if path.name != "kustomization.yaml"}, folder
    assert kustomization(WITH_JOBS)["resources"] == ["../k8s", "../k8s/jobs"]


def autoscaler_with_jobs() -> dict:
    """The style-transfer autoscaler as deploy/k8s-with-jobs/ makes it: `kubectl kustomize` where kubectl is
    installed; else its patch (JSON Patch `add` operations) applied to deploy/k8s/hpa.yaml here."""
    if shutil.which("kubectl"):
        rendered = subprocess.run(["kubectl", "kustomize", str(WITH_JOBS)], capture_output=True, text=True,
                                  timeout=60, check=True).stdout
        (hpa,) = [doc for doc in yaml.safe_load_all(rendered) if doc["kind"] == "HorizontalPodAutoscaler"]
        return hpa
    hpa = objects(DEPLOY / "k8s" / "hpa.yaml")["HorizontalPodAutoscaler"]
    (patch,) = kustomization(WITH_JOBS)["patches"]
    for operation in yaml.safe_load(patch["patch"]):
        assert operation["op"] == "add" and operation["path"] == "/spec/metrics/-", operation
        hpa["spec"]["metrics"].append(operation["value"])
    return hpa


def test_the_autoscaler_follows_the_jobs_queue_only_where_the_jobs_service_is_deployed():
    """Without the jobs service (deploy/k8s/) the autoscaler has no metric that nothing reports (it would never
    scale down); with it (deploy/k8s-with-jobs/) it follows the jobs waiting too, a series /metrics serves."""
    alone = objects(DEPLOY / "k8s" / "hpa.yaml")["HorizontalPodAutoscaler"]
    assert [metric["type"] for metric in alone["spec"]["metrics"]] == ["Pods"]
    with_jobs = autoscaler_with_jobs()
    kubernetes_validate.validate(with_jobs, "1.29", strict=True)
    assert with_jobs["spec"]["metrics"][:1] == alone["spec"]["metrics"]
    (external,) = [metric["external"]["metric"]["name"] for metric in with_jobs["spec"]["metrics"]
                   if metric["type"] == "External"]
    (adapter,) = objects(DEPLOY / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml").values()
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["externalRules"]
    assert [rule["name"]["matches"] for rule in rules] == [f"^{external}$"]
    assert external in {name for name, *_ in METRICS}  # a series /metrics serves


def test_a_replica_stops_within_its_grace_period_and_survives_redis_restarts():
    """The pod's grace period holds the preStop pause and the service's own shutdown twice over; its probes do
    not ask Redis; the model description it checks submits against comes through the auth proxy; its Redis
    evicts nothing (the service refuses to run otherwise)."""
    pod = objects(JOBS_K8S / "jobs.yaml")["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    shutdown = float(env.get("STYLE_JOBS_SHUTDOWN_SECONDS", JobsConfig.shutdown_seconds))
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= 2 * (pause + shutdown)
    assert {container[probe]["httpGet"]["path"] for probe in ("readinessProbe", "livenessProbe")} == {"/ping"}
    assert env["STYLE_JOBS_TORCHSERVE_MANAGEMENT_URL"] == env["STYLE_JOBS_TORCHSERVE_URL"]
    (redis,) = objects(JOBS_K8S / "redis.yaml")["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    assert redis["args"][redis["args"].index("--maxmemory-policy") + 1] == SAFE_EVICTION_POLICY
    # a limit of its own, under its container's: it refuses writes at it rather than being killed past it
    maxmemory = redis["args"][redis["args"].index("--maxmemory") + 1]
    assert maxmemory == "1gb" and redis["resources"]["limits"]["memory"] == "2Gi"


def test_the_docs_name_the_jobs_settings_that_exist_with_their_defaults():
    docs = " ".join(path.read_text() for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    docs = " ".join(docs.split())
    settings = {f"STYLE_JOBS_{field.name.upper()}": field for field in dataclasses.fields(JobsConfig)}
    named = set(re.findall(r"STYLE_JOBS_[A-Z_]+[A-Z]", docs))
    assert named <= set(settings), named - set(settings)
    for name, number in re.findall(r"`(STYLE_JOBS_[A-Z_]+)`,? \(?(\d+) s\b", docs):
        assert float(number) == settings[name].default, (name, number)
