"""The handler's settings (handler/model-config.yaml's `handler:` section): checked at start, by device."""

import pytest
import yaml

from conftest import ROOT
from server_config import ServerConfig

MODEL_YAML = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())


def test_the_archives_settings_differ_by_device_where_they_say_so():
    cpu, gpu = (ServerConfig.from_model_yaml(MODEL_YAML, kind) for kind in ("cpu", "cuda"))
    assert cpu.maxima["size"] == 1024 and gpu.maxima["size"] == 8192
    assert cpu.maxima["steps"] == gpu.maxima["steps"]  # overridden key by key, the rest kept
    assert cpu.max_style_pixels < gpu.max_style_pixels
    assert gpu.seconds_per_call == MODEL_YAML["responseTimeout"] - MODEL_YAML["handler"]["reply_margin_seconds"]


@pytest.mark.parametrize("change, says", [
    ({"max_batch_size": 3}, "unknown keys ['max_batch_size']"),
    ({"device_overrides": {"cpu": {"sizes": 1}}}, "handler.device_overrides.cpu: unknown keys ['sizes']"),
    ({"device_overrides": {"cpu": {"device_overrides": {}}}}, "unknown keys ['device_overrides']"),
    ({"response_timeout": 10}, "unknown keys ['response_timeout']"),  # TorchServe's own responseTimeout rules
    ({"maxima": {"max_seconds": 290}}, "must leave reply_margin_seconds"),
    ({"device_overrides": {"cpu": {"maxima": {"size": 9000}}}}, "at most 8192"),  # the engine's own bound
])
def test_a_wrong_setting_stops_the_worker_at_start_with_a_reason(change, says):
    handler = {**MODEL_YAML["handler"], **change}
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        ServerConfig.from_model_yaml({**MODEL_YAML, "handler": handler}, "cpu")


@pytest.mark.parametrize("properties", ["config.properties", "deploy/config.properties",
                                        "deploy/kserve/config/config.properties"])
def test_the_handler_knows_each_servers_max_response_size(properties):
    """The handler refuses what TorchServe's max_response_size would not let through (it would drop the worker
    instead): every config.properties that serves the archive must say the same as the archive."""
    settings = dict(line.split("=", 1) for line in (ROOT / properties).read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    for kind in ("cpu", "cuda"):
        assert ServerConfig.from_model_yaml(MODEL_YAML, kind).max_response_size == int(settings["max_response_size"])
