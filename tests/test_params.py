"""The one parameter parser: defaults, type coercion from form fields, and an error naming each bad field."""

import math

import pytest

from style_engine import OutputParams, ParamError, StyleParams, parse_params
from style_engine.params import SEED_STYLE_LAYERS, describe_params, validate_server_config


def test_defaults_are_the_seeds_objective():
    style, output = parse_params({})
    assert style == StyleParams() and output == OutputParams()
    assert (style.content_layer, style.style_layers) == ("relu4_2", SEED_STYLE_LAYERS)
    assert (style.content_weight, style.style_weight, style.tv_weight) == (1.0, 1e6, 0.0)
    assert (style.pooling, style.init, output.format, output.response) == ("max", "content", "png", "image")


def test_form_field_strings_are_read_as_their_types():
    style, output = parse_params({"size": "64", "lr": "0.5", "stream": "true", "preserve_color": "false",
                                  "style_layers": '{"relu2_1": 1, "relu1_1": 0.5}', "style_blend": "[1, 0]"})
    assert (style.size, style.lr, output.stream, style.preserve_color) == (64, 0.5, True, "none")
    assert style.style_layers == (("relu1_1", 0.5), ("relu2_1", 1.0))  # in network order
    assert style.style_blend == (1.0, 0.0)


def test_json_values_and_aliases():
    style, _ = parse_params({"size": 64.0, "preserve_color": True, "optimizer": "ADAM", "lr": None})
    assert (style.size, style.preserve_color, style.optimizer, style.lr) == (64, "luminance", "adam", None)


@pytest.mark.parametrize("field, value, allowed", [
    ("size", 31, "at least 32"), ("size", 9000, "at most 8192"), ("size", 64.5, "an integer"),
    ("size", "abc", "an integer"), ("size", True, "an integer"), ("size", None, "an integer"),
    ("steps", 0, "at least 1"), ("steps", -5, "at least 1"), ("steps", [], "an integer"),
    ("lr", 0, "greater than 0"), ("lr", math.nan, "a number"), ("lr", "inf", "a number"),
    ("content_weight", -1, "at least 0"), ("style_weight", math.inf, "a number"), ("tv_weight", "x", "a number"),
    ("style_scale", 0.01, "at least 0.05"), ("seed", -1, "at least 0"), ("seed", 2**31, "at most"),
    ("max_seconds", 0, "greater than 0"), ("early_stop_tol", 2, "at most 1"), ("early_stop_window", 0, "at least 1"),
    ("min_scale", 15, "at least 16"), ("size", "null", "an integer"),
    ("optimizer", "sgd", '"lbfgs", "adam"'), ("init", 3, '"content", "noise", "style"'),
    ("pooling", "min", '"max", "avg"'), ("preserve_color", "yes", '"luminance"'), ("precision", "fp16", '"bf16"'),
    ("format", "gif", '"png", "jpeg", "webp"'), ("response", "xml", '"image", "json"'), ("quality", 0, "at least 1"),
    ("stream", "maybe", "true or false"), ("preview", 1, "true or false"),
    ("content_layer", "relu9_9", "VGG19 layer name"), ("content_layer", 42, "VGG19 layer name"),
    ("style_layers", {"relu9_9": 1}, "VGG19 layer name"), ("style_layers", {}, "object of VGG19 layer names"),
    ("style_layers", {"relu1_1": -1}, "at least 0"), ("style_layers", {"relu1_1": 0}, "at least one layer"),
    ("style_layers", "[1, 2", "not valid JSON"), ("style_layers", [1, 2], "object of VGG19 layer names"),
    ("style_blend", [], "one weight >= 0 per style image"), ("style_blend", [1, -1], "at least 0"),
    ("style_blend", [0, 0], "positive sum"), ("style_blend", "nan", "one weight"), ("style_blend", "[NaN]", "a number"),
    ("presets", 5, "a list of names"), ("presets", ["starry_night", 1], "a list of names"),
    ("presets", ["a", " "], "a list of names"), ("presets", '["a",', "not valid JSON"), ("init", "photo", '"image"'),
])
def test_every_invalid_value_names_its_field(field, value, allowed):
    with pytest.raises(ParamError) as error:
        parse_params({field: value})
    assert error.value.field.split(".")[0].split("[")[0] == field
    assert allowed in str(error.value) and field in str(error.value)
    assert error.value.to_json() == {"code": 400, "type": "InvalidParameter", "message": str(error.value),
                                     "field": error.value.field}


def test_unknown_parameter_and_non_object():
    with pytest.raises(ParamError, match="unknown parameter 'iterations'") as error:
        parse_params({"iterations": 5})
    assert error.value.field == "iterations"
    with pytest.raises(ParamError, match="params must be a JSON object") as error:
        parse_params([1, 2])
    assert error.value.field == "params"


def test_server_defaults_and_maxima():
    style, _ = parse_params({"steps": 10}, defaults={"size": 128, "steps": 50}, maxima={"size": 512})
    assert (style.size, style.steps) == (128, 10)
    with pytest.raises(ParamError, match="at most 512"):
        parse_params({"size": 513}, maxima={"size": 512})
    validate_server_config({"size": 128}, {"size": 512, "steps": 1000})
    with pytest.raises(ParamError, match="at most 8192"):
        validate_server_config({}, {"size": 10_000})  # a server cannot widen the engine's bounds
    with pytest.raises(ParamError, match="only numeric"):
        validate_server_config({}, {"optimizer": 1})


def test_a_null_time_budget_is_the_servers_maximum():
    """null asks for no budget of the request's own; it must not lift the server's cap."""
    style, _ = parse_params({"max_seconds": None}, defaults={"max_seconds": 240}, maxima={"max_seconds": 270})
    assert style.max_seconds == 270
    assert parse_params({"max_seconds": None})[0].max_seconds is None  # the engine alone has no cap
    assert parse_params({"lr": None}, maxima={"lr": 10})[0].lr is None  # null lr is the optimiser's default


def test_integers_beyond_a_floats_range_are_out_of_bounds():
    """JSON integers have no size limit; one past a float's range (found by fuzzing from openapi.yaml) once
    raised OverflowError, a 503 from TorchServe instead of our 400."""
    for field, value, allowed in (("size", 10**400, "at most 8192"), ("seed", -10**400, "at least 0"),
                                  ("content_weight", 10**400, "at most 1e+12"), ("style_blend", [10**400], "at most")):
        with pytest.raises(ParamError) as error:
            parse_params({field: value})
        assert error.value.field.split("[")[0] == field and allowed in str(error.value)


def test_a_plain_form_field_spells_null_as_json_does():
    """Form fields carry objects, lists and booleans in their JSON spelling; null is spelled so too."""
    style, _ = parse_params({"lr": "null", "max_seconds": "null", "style_blend": "null"},
                            maxima={"max_seconds": 270})
    assert (style.lr, style.max_seconds, style.style_blend) == (None, 270, None)


def test_every_parameter_is_described():
    described = {row["name"] for row in describe_params()}
    assert described == {*StyleParams.__dataclass_fields__, *OutputParams.__dataclass_fields__}
    assert all(row["doc"] and row["allowed"] for row in describe_params())


def test_each_parameters_schema_admits_what_the_parser_admits_and_no_more():
    """The schema of the description (what the playground page builds its controls from) agrees with the parser
    at its edges, for a server's maxima as for the engine's."""
    maxima = {"size": 512, "max_seconds": 270}
    for row in describe_params(maxima=maxima):
        name, schema = row["name"], row["schema"]
        parse_params({name: row["default"]}, maxima=maxima)  # every default is allowed
        for value in schema.get("enum", []):
            parse_params({name: value}, maxima=maxima)
        if "maximum" in schema:
            low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema["maximum"]
            nudge = (lambda _: 1) if "integer" in schema["type"] else (lambda edge: 1e-6 * max(1.0, abs(edge)))
            parse_params({name: high}, maxima=maxima)
            outside = [high + nudge(high), low - nudge(low)] + ([low] if "exclusiveMinimum" in schema else [])
            for value in outside:
                with pytest.raises(ParamError):
                    parse_params({name: value}, maxima=maxima)
    described = {row["name"]: row["schema"] for row in describe_params(maxima=maxima)}
    assert described["size"] == {"type": "integer", "minimum": 32, "maximum": 512}
    assert described["lr"] == {"type": ["number", "null"], "exclusiveMinimum": 0.0, "maximum": 100.0}
    assert described["preserve_color"] == {"enum": ["none", "luminance", "histogram", True, False]}
    assert described["stream"] == {"type": "boolean"}


def test_presets_are_a_list_or_a_comma_separated_form_field_in_lower_case():
    assert parse_params({"presets": ["Starry_Night", "shipwreck"]})[0].presets == ("starry_night", "shipwreck")
    assert parse_params({"presets": " starry_night , Shipwreck"})[0].presets == ("starry_night", "shipwreck")
    assert parse_params({"presets": '["starry_night"]'})[0].presets == ("starry_night",)
    assert parse_params({"presets": ""})[0].presets == parse_params({})[0].presets == ()


def test_a_servers_description_of_the_parameters_applies_its_defaults_and_maxima():
    described = {row["name"]: row for row in describe_params(defaults={"size": 128, "max_seconds": 240},
                                                               maxima={"size": 512, "max_seconds": 270})}
    assert (described["size"]["default"], described["max_seconds"]["default"]) == (128, 240)
    assert described["size"]["allowed"] == "an integer at least 32 and at most 512"
    assert described["steps"]["allowed"] == "an integer at least 1 and at most 10000"  # no maximum: the engine's
    assert described["style_layers"]["default"] == dict(SEED_STYLE_LAYERS)  # JSON values, not their text
    assert (described["presets"]["default"], described["style_blend"]["default"]) == ([], None)
