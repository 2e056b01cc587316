"""Masks, presets, a start image and the model description, against a real TorchServe (Java), over REST and gRPC."""

import base64
import io
import json
import subprocess
import sys

import grpc
import inference_pb2
import inference_pb2_grpc
import pytest
import requests
import torch
from PIL import Image

from conftest import ROOT, SAMPLES, STYLES, sample
from style_engine import StyleJob, parse_params
from style_engine.codec import decode_image, decode_mask
from style_engine.targets import build_objective

pytestmark = pytest.mark.integration

CONTENT = (SAMPLES / "tubingen.jpg").read_bytes()
STYLE = (STYLES / "starry_night.jpg").read_bytes()
STYLE_2 = (STYLES / "woman-with-hat-matisse.jpg").read_bytes()
OUTPUT = (48, 64)  # tubingen at size 64


def mask_png(white_columns: slice, size=(64, 48)) -> bytes:
    """A mask white in `white_columns` of its width, black elsewhere."""
    image = Image.new("L", size, 0)
    start, stop, _ = white_columns.indices(size[0])
    image.paste(255, (start, 0, stop, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


LEFT, RIGHT = mask_png(slice(0, 32)), mask_png(slice(32, None))


def predict(server, files: dict, params: dict, **kwargs) -> requests.Response:
    return requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(), files=files,
                         data={"params": json.dumps(params)}, timeout=120, **kwargs)


def grpc_predict(server, inputs: dict):
    with grpc.insecure_channel(server.grpc_target) as channel:
        return inference_pb2_grpc.InferenceAPIsServiceStub(channel).Predictions(
            inference_pb2.PredictionsRequest(model_name="style_transfer", input=inputs),
            metadata=(("authorization", f"Bearer {server.key()}"),), timeout=120)


def test_a_preset_alone_over_rest_and_grpc(server):
    over_rest = predict(server, {"content": CONTENT}, {"presets": ["starry_night"], "size": 64, "steps": 5,
                                                       "init": "noise"})
    assert over_rest.status_code == 200, over_rest.text
    assert Image.open(io.BytesIO(over_rest.content)).size == (64, 48)
    # the same request with the painting uploaded: the preset is that image
    uploaded = predict(server, {"content": CONTENT, "style": STYLE}, {"size": 64, "steps": 5, "init": "noise"})
    assert uploaded.headers["X-Style-Loss"] == over_rest.headers["X-Style-Loss"]
    over_grpc = grpc_predict(server, {"content": CONTENT, "presets": b"starry_night",
                                      "params": json.dumps({"size": 64, "steps": 5, "init": "noise"}).encode()})
    assert over_grpc.prediction == over_rest.content


def test_two_styles_with_complementary_masks_over_rest(server, extractor):
    """Each half of the answer takes its own style: its guided style loss against that style, computed here
    with the server's weights (random, as the `extractor` has them), is far lower than that of the answer with
    the masks swapped."""
    params = {"size": 64, "steps": 20, "early_stop_tol": 0, "precision": "fp32"}
    results = []
    for masks in ((LEFT, RIGHT), (RIGHT, LEFT)):
        response = predict(server, {"content": CONTENT, "style": STYLE, "style_2": STYLE_2, "mask_1": masks[0],
                                    "mask_2": masks[1]}, params)
        assert response.status_code == 200, response.text
        results.append(decode_image(response.content, "result", max_pixels=10**6))
    for style, mask in ((STYLE, LEFT), (STYLE_2, RIGHT)):
        job = StyleJob(sample("tubingen.jpg"), (decode_image(style, "style", max_pixels=10**7),),
                       parse_params(params)[0], (decode_mask(mask, "mask", max_pixels=10**6),))
        objective = build_objective(extractor, [job], OUTPUT, OUTPUT, bf16=False)
        with torch.no_grad():
            own, swapped = (objective(extractor(image[None], objective.layers), image[None]).style.item()
                            for image in results)
        assert own < 0.1 * swapped, (own, swapped)


def test_a_start_image_refines_an_earlier_result(server):
    first = predict(server, {"content": CONTENT}, {"presets": "shipwreck", "size": 64, "steps": 5})
    refined = predict(server, {"content": CONTENT, "init_image": first.content},
                      {"presets": "shipwreck", "size": 64, "steps": 5, "init": "image", "response": "json"})
    assert refined.status_code == 200, refined.text
    assert refined.json()["loss"]["initial"]["total"] == pytest.approx(float(first.headers["X-Style-Loss"]),
                                                                       rel=0.05)  # PNG rounds the pixels


def test_the_describe_call_lists_the_presets_parameters_and_limits(server):
    response = requests.get(server.url("management", "/models/style_transfer?customized=true"),
                            headers=server.auth("management"), timeout=60)
    assert response.status_code == 200, response.text
    (model,) = response.json()
    assert model["modelName"] == "style_transfer"  # TorchServe's own description, with ours in it
    described = model["customizedMetadata"]
    assert [(p["name"], p["width"], p["height"]) for p in described["presets"]] == [
        ("shipwreck", 512, 353), ("starry_night", 512, 320), ("woman-with-hat-matisse", 378, 512)]
    parameters = {row["name"]: row for row in described["parameters"]}
    assert parameters["presets"]["default"] == [] and parameters["size"]["allowed"].endswith("at most 1024")
    assert set(parameters) >= {"size", "steps", "style_blend", "init", "presets", "format", "stream"}
    assert described["limits"]["max_styles"] == 4
    assert (described["weights"], described["device"]) == ("random", "cpu")
    plain = requests.get(server.url("management", "/models/style_transfer"), headers=server.auth("management"),
                         timeout=60).json()[0]
    assert "customizedMetadata" not in plain


def test_a_describe_header_on_the_inference_api_gets_a_prediction_not_the_description(server):
    """Only the management API (with its own key) describes the model; on the inference API the header is the
    client's, and the request a prediction like any other."""
    response = requests.post(server.url("inference", "/predictions/style_transfer"),
                             headers={**server.auth(), "describe": "True"}, files={"content": CONTENT, "style": STYLE},
                             data={"params": json.dumps({"size": 64, "steps": 1})}, timeout=120)
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/png", response.text[:200]
    no_body = requests.post(server.url("inference", "/predictions/style_transfer"),
                            headers={**server.auth(), "describe": "True"}, timeout=120)
    assert no_body.status_code == 400 and no_body.json()["type"] == "InvalidParameter"  # no body: no description


NOT_AN_IMAGE = b"not an image at all"


@pytest.mark.parametrize("files, params, status, kind, field, says", [
    ({"content": CONTENT, "style": STYLE, "mask_1": LEFT, "mask_2": NOT_AN_IMAGE}, {"presets": ["shipwreck"]},
     400, "InvalidImage", "mask_2", "mask_2 is not an image in a supported format"),
    ({"content": CONTENT, "style": STYLE, "mask_1": LEFT, "mask_2": RIGHT}, {}, 400, "InvalidImage", "mask_2",
     "2 masks for 1 style(s)"),
    ({"content": CONTENT, **{f"mask_{n}": LEFT for n in range(1, 6)}}, {"presets": ["shipwreck"]}, 400,
     "InvalidImage", "mask_5", "more masks than styles"),
    ({"content": CONTENT, "style": STYLE, "mask_2": LEFT}, {}, 400, "InvalidImage", "mask_2",
     "mask_2 was sent without mask_1"),
    ({"content": CONTENT}, {"presets": ["starry_night", "mona_lisa"]}, 400, "InvalidParameter", "presets",
     "unknown preset 'mona_lisa'; this server has: shipwreck, starry_night, woman-with-hat-matisse"),
    ({"content": CONTENT, "style": STYLE}, {"init": "image"}, 400, "InvalidImage", "init_image",
     'init is "image" but the image part init_image is missing'),
    ({"content": CONTENT, "style": STYLE, "init_image": CONTENT}, {}, 400, "InvalidImage", "init_image",
     "init_image was sent but init is 'content'"),
    ({"content": CONTENT, "style": STYLE, "style_2": STYLE, "style_3": STYLE},
     {"presets": ["shipwreck", "starry_night"]}, 413, "TooLarge", "presets",
     "3 uploaded and 2 preset style(s): at most 4 styles are allowed"),
], ids=["mask not an image", "more masks than styles", "more masks than any request's styles", "gap in masks",
        "unknown preset", "init image missing", "init image unused", "too many styles with presets"])
def test_each_mistake_is_refused_naming_its_field_before_any_work(server, files, params, status, kind, field, says):
    response = predict(server, files, {"size": 64, "steps": 1, **params})
    assert response.status_code == status, response.text
    error = response.json()
    assert (error["type"], error["field"]) == (kind, field) and says in error["message"], error


def test_a_json_body_and_grpc_name_the_same_fields(server):
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    body = {"content": b64(CONTENT), "style": [b64(STYLE)], "masks": [b64(LEFT), b64(NOT_AN_IMAGE)],
            "params": {"presets": ["shipwreck"], "size": 64, "steps": 1}}
    response = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                             json=body, timeout=60)
    assert (response.status_code, response.json()["field"]) == (400, "mask_2")
    body = {"content": b64(CONTENT), "style": [b64(STYLE)], "params": {"size": 64, "steps": 1, "init": "image"}}
    response = requests.post(server.url("inference", "/predictions/style_transfer"), headers=server.auth(),
                             json=body, timeout=60)
    assert (response.status_code, response.json()["field"]) == (400, "init_image")
    with pytest.raises(grpc.RpcError) as error:
        grpc_predict(server, {"content": CONTENT, "presets": b"mona_lisa"})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert json.loads(error.value.details().split("\n")[0])["field"] == "presets"


@pytest.mark.parametrize("transport", ["url", "grpc"])
def test_the_client_sends_presets_and_masks(server, tmp_path, transport):
    """The preset's mask is black: no region, so no style term, and the content's start is already optimal."""
    address = server.url("inference") if transport == "url" else server.grpc_target
    (tmp_path / "left.png").write_bytes(LEFT)
    (tmp_path / "black.png").write_bytes(mask_png(slice(0, 0)))
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "stylize.py"), str(SAMPLES / "tubingen.jpg"),
                          str(STYLES / "shipwreck.jpg"), "--preset", "starry_night", "--mask",
                          str(tmp_path / "left.png"), "--mask", str(tmp_path / "black.png"), "-o",
                          str(tmp_path / "out.png"), f"--{transport}", address, "--key-file",
                          str(server.workdir / "key_file.json"), "--set", "size=64", "--set", "steps=3",
                          "--set", "style_blend=[0, 1]", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    fields = json.loads(run.stdout)
    assert fields["loss"]["initial"]["total"] == 0 and Image.open(tmp_path / "out.png").size == (64, 48)


def test_the_client_lists_the_servers_presets(server):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "stylize.py"), "--list-presets", "--management",
                          server.url("management"), "--key-file", str(server.workdir / "key_file.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["shipwreck\t512x353", "starry_night\t512x320",
                                      "woman-with-hat-matisse\t378x512"]
