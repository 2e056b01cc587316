"""A minimal TorchServe context for running the handler in-process, as TorchServe's worker builds it."""

import uuid
from pathlib import Path

import torch
import yaml
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from build_mar import stage_presets

ROOT = Path(__file__).resolve().parents[2]
HANDLER_DIR = ROOT / "handler"
STYLES = ROOT / "samples" / "styles"


def model_dir_with_weights(directory: Path, state_dict: dict) -> Path:
    """What TorchServe unpacks the archive into, minus the code (already importable here): the weights, and
    the presets as scripts/build_mar.py stores them (the sample paintings)."""
    torch.save(state_dict, directory / "vgg19_features.pth")
    stage_presets(STYLES, directory)
    return directory


def make_context(model_dir: Path, handler_overrides: dict | None = None) -> Context:
    model_yaml = yaml.safe_load((HANDLER_DIR / "model-config.yaml").read_text())
    model_yaml["handler"].update(handler_overrides or {})
    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "style_transfer"
    return Context("style_transfer", str(model_dir), {}, 1, None, "0.12.0", metrics=metrics,
                   model_yaml_config=model_yaml)


def start_batch(context: Context, size: int, grpc: bool = False, describe: tuple[int, ...] = ()) -> None:
    """Per-batch state TorchServe's service sets before calling handle(). REST requests carry HTTP headers
    (strings); gRPC ones only per-parameter content types (dicts), as TorchServe 0.12 passes them. The indices
    in `describe` are the management API's describe calls: HTTP headers and "describe": "True"."""
    headers = {"content": {"content-type": ""}} if grpc else {"Content-Type": "multipart/form-data", "url_path": ""}
    context.request_ids = {i: str(uuid.uuid4()) for i in range(size)}
    context.request_processor = [RequestProcessor({"Accept": "*/*", "describe": "True"} if i in describe
                                                  else dict(headers)) for i in range(size)]
    context.metrics.set_request_ids(context.request_ids)
