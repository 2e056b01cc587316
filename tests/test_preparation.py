"""Preparing a request (handler/preparation.py) reads top to bottom: parse → check → decode → size → admit, each
step in a file of its own, none entered twice. Plain objects, no TorchServe context."""

import sys

import pytest
import torch
import yaml

from conftest import ROOT, SAMPLES, STYLES
from decoding import DecodingBudget
from preparation import Preparation
from server_config import ServerConfig
from style_engine.cost import DeviceSpeed, PassTime
from style_engine.presets import PresetLibrary

HANDLER = ROOT / "handler"
STEPS = ["request_parsing.py", "style_engine/params.py", "decoding.py", "style_engine/targets.py", "answers.py",
         "style_engine/memory.py", "style_engine/cost.py"]  # parse, check, decode, size, admit (answer, memory, time)


@pytest.fixture(scope="module")
def preparation(extractor):
    config = ServerConfig.from_model_yaml(yaml.safe_load((HANDLER / "model-config.yaml").read_text()))
    speed = DeviceSpeed(forward={False: PassTime(1e-3, 1e-10)}, iteration={False: PassTime(3e-3, 2e-10)},
                        encode=1e-7)  # a fast device, made up
    return Preparation(config, extractor, PresetLibrary({}), torch.device("cpu"), 2**34, speed, time_cap=60)


def files_entered_from(module_file: str, call) -> list[str]:
    """The project files (relative to handler/) that functions of `module_file` call into while `call()` runs,
    in order, each run of calls into one file counted once."""
    entered: list[str] = []

    def profile(frame, event, arg):
        caller = frame.f_back
        if event != "call" or caller is None or caller.f_code.co_filename != module_file:
            return
        callee = frame.f_code.co_filename
        if callee.startswith(str(HANDLER)) and callee != module_file:
            name = callee[len(str(HANDLER)) + 1:]
            if not entered or entered[-1] != name:
                entered.append(name)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered


def test_a_walk_of_one_request_through_preparation_enters_each_step_s_file_once(preparation):
    import preparation as module

    row = {"content": (SAMPLES / "tubingen.jpg").read_bytes(), "style": (STYLES / "starry_night.jpg").read_bytes(),
           "mask_1": (SAMPLES / "masks" / "tubingen-sky.png").read_bytes(), "params": {"size": 64, "steps": 2}}
    prepared = []
    walk = files_entered_from(module.__file__, lambda: prepared.append(
        preparation.prepare(row, grpc=False, decoding=DecodingBudget(10**9))))
    assert walk == STEPS
    assert prepared[0].job.content.shape[-2:] == (48, 64) and prepared[0].output.format == "png"
