"""openapi.yaml is valid OpenAPI 3.1 and says what the code does: every parameter of params.py with its type,
bounds, choices and default, every part the parsers read, every answer the handler gives. The fuzzing of
tests/test_api_fuzz.py then holds a real server to it."""

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate

from conftest import ROOT
from request_parsing import JSON_BODY_KEYS
from streaming import CONTENT_TYPE as STREAM_CONTENT_TYPE
from style_engine.errors import MAX_FIELD_CHARS, MAX_MESSAGE_CHARS, ParamError
from style_engine.params import PARAM_FIELDS, describe_params
from answers import CONTENT_TYPES
from failures import DEVICE_FAILED, INTERNAL_ERROR, OUT_OF_MEMORY
from style_transfer_handler import BUSY

SPEC = yaml.safe_load((ROOT / "openapi.yaml").read_text())
SCHEMAS = SPEC["components"]["schemas"]
OPERATION = SPEC["paths"]["/predictions/style_transfer"]["post"]
ANNOTATIONS = {"description", "default", "examples", "title"}


def resolve(schema):
    """`schema` with every local $ref replaced by what it points to (its siblings kept), annotations dropped."""
    if isinstance(schema, list):
        return [resolve(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = SPEC
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        schema = {**target, **{key: value for key, value in schema.items() if key != "$ref"}}
    return {key: resolve(value) for key, value in schema.items() if key not in ANNOTATIONS}


def test_the_spec_is_valid_openapi_3_1():
    assert SPEC["openapi"].startswith("3.1.")
    validate(SPEC)


@pytest.mark.parametrize("param", describe_params(), ids=lambda param: param["name"])
def test_every_parameter_is_in_the_spec_as_params_py_defines_it(param):
    spec_params = SCHEMAS["Params"]["properties"]
    assert param["name"] in spec_params, f"openapi.yaml lacks the parameter {param['name']}"
    assert spec_params[param["name"]]["default"] == param["default"]
    # the description's JSON Schema is params.py's own (tests/test_params.py holds it to the parser)
    assert resolve(spec_params[param["name"]]) == param["schema"]


def test_the_spec_has_no_parameter_params_py_lacks():
    assert SCHEMAS["Params"]["additionalProperties"] is False
    assert list(SCHEMAS["Params"]["properties"]) == [param["name"] for param in describe_params()]


def test_every_parameter_is_a_form_field_too():
    fields = SCHEMAS["MultipartRequest"]["properties"]
    for name in PARAM_FIELDS:
        assert fields[name] == {"$ref": f"#/components/schemas/Params/properties/{name}"}, name


def test_the_parts_are_the_parsers():
    assert set(SCHEMAS["JsonRequest"]["properties"]) == set(JSON_BODY_KEYS)
    assert set(SCHEMAS["MultipartRequest"]["properties"]) - set(PARAM_FIELDS) == {
        "content", "style", "init_image", "checkpoint", "params"}


def test_an_error_echoes_at_most_what_the_spec_says():
    sent = "x" * 10_000
    error = ParamError(sent, sent).to_json()
    bounds = SCHEMAS["Error"]["properties"]
    assert len(error["message"]) == bounds["message"]["maxLength"] > MAX_MESSAGE_CHARS
    assert len(error["field"]) == bounds["field"]["maxLength"] > MAX_FIELD_CHARS


@pytest.mark.parametrize("error, schema", [
    (DEVICE_FAILED, "DeviceFailure"), (OUT_OF_MEMORY, "OutOfMemory"), (INTERNAL_ERROR, "InternalError"),
    (BUSY, "Busy"),
    (ParamError("size", "size must be...").to_json(), "BadRequest")])
def test_the_handlers_errors_are_the_specs(error, schema):
    jsonschema.validate(error, resolve({"$ref": f"#/components/schemas/{schema}"}))
    answer = OPERATION["responses"][str(error["code"])]["content"]["application/json"]["schema"]
    assert {"$ref": f"#/components/schemas/{schema}"} in answer.get("oneOf", [answer])


def test_every_content_type_the_handler_answers_with_is_documented():
    documented = set(OPERATION["responses"]["200"]["content"])
    assert documented == {*CONTENT_TYPES.values(), "application/json", STREAM_CONTENT_TYPE}


def test_the_api_page_links_the_spec():
    """The API page sends readers to the reference rendered from openapi.yaml, and to the gRPC service's proto."""
    api_page = (ROOT / "docs" / "api.md").read_text()
    assert "(http-api.md)" in api_page and "`openapi.yaml`" in api_page and "proto/inference.proto" in api_page
