"""Submit checks: what `POST /predictions/style_transfer` would refuse with 400 or 413 for a request's fields,
parameters, preset names or declared image sizes is refused at submit, with the same error body, by the
handler's own code (handler/request_parsing.py, style_engine's params and the header reading of its codec),
which needs no torch. What only the optimisation can tell (how style images scale, whether the work fits the
worker's memory and time) is still decided when the job runs, and such a job ends `failed` with that error.

A server may lower the engine's maxima, and sets its presets and image limits: those come from TorchServe's
description of the model (torchserve.py's describe), read at start and every DESCRIBE_EVERY_SECONDS. Until it
has been read once (TorchServe not reachable since this service started), only what holds on every server is
checked: the fields, the engine's own bounds and that every image has a readable header.
"""

import asyncio
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HANDLER_DIR = Path(__file__).resolve().parent.parent / "handler"  # deploy/Dockerfile.jobs copies it the same way
ENGINE = "style_engine"


def _engine_modules_without_torch() -> None:
    """Let style_engine's modules be imported without style_engine/__init__.py, which imports the optimiser and
    so torch: the package is registered without running it, and its modules are found in its directory as
    usual. Where the engine is already imported (a process that has torch), nothing changes."""
    if ENGINE not in sys.modules:
        directory = HANDLER_DIR / ENGINE
        spec = importlib.util.spec_from_file_location(ENGINE, directory / "__init__.py",
                                                      submodule_search_locations=[str(directory)])
        sys.modules[ENGINE] = importlib.util.module_from_spec(spec)


sys.path.insert(0, str(HANDLER_DIR))
_engine_modules_without_torch()

from request_parsing import declared_pixels, parse_request  # noqa: E402
from style_engine.errors import ParamError, RequestError, TooLargeError  # noqa: E402
from style_engine.params import parse_params  # noqa: E402
from style_engine.presets import PresetLibrary  # noqa: E402

logger = logging.getLogger(__name__)

DESCRIBE_EVERY_SECONDS = 60.0  # a TorchServe with another archive is seen within this
DESCRIBE_RETRY_SECONDS = 5.0  # until the first description is read


@dataclass(frozen=True)
class ServerLimits:
    """What the server allows; the defaults hold on any server (nothing the engine takes is refused)."""
    max_styles: int = sys.maxsize
    max_image_pixels: int = sys.maxsize
    max_decoded_pixels_per_call: int = sys.maxsize
    maxima: dict[str, float] = field(default_factory=dict)  # a direct request's
    job_maxima: dict[str, float] = field(default_factory=dict)  # a job's (it runs as segments)
    presets: tuple[str, ...] | None = None  # None: not known

    @classmethod
    def from_description(cls, description: dict) -> "ServerLimits":
        limits = description["limits"]
        # a previous release's server has no job_maxima: a job there may ask what a direct request may
        return cls(limits["max_styles"], limits["max_image_pixels"],
                   limits.get("max_decoded_pixels_per_call", sys.maxsize), dict(limits["maxima"]),
                   dict(limits.get("job_maxima", limits["maxima"])),
                   tuple(preset["name"] for preset in description.get("presets", [])))


def refusal(row: dict[str, Any], limits: ServerLimits) -> dict | None:
    """The error body the handler would answer for this TorchServe input row (the fields by name, or a raw JSON
    body under "body") before any work, or None when it would take it that far."""
    try:
        _check(row, limits)
    except RequestError as error:
        return error.to_json()
    return None


def _check(row: dict[str, Any], limits: ServerLimits) -> None:
    """What the handler's _prepare checks before decoding, in its order."""
    request = parse_request(row, limits.max_styles)
    try:
        style_params, _ = parse_params(request.params, maxima=limits.job_maxima)
    except ParamError as refused:
        _as_the_endpoint_refuses(request.params, refused, limits.maxima)
        raise
    pixels = declared_pixels(request, limits.max_image_pixels)
    if pixels > limits.max_decoded_pixels_per_call:  # decoding.DecodingBudget's refusal of a request alone
        raise TooLargeError("content", f"the images of this request declare {pixels} pixels together; at most "
                                       f"{limits.max_decoded_pixels_per_call} are decoded for one request: send "
                                       f"smaller images")
    if limits.presets is not None:  # only the names matter to this check
        PresetLibrary(dict.fromkeys(limits.presets)).images(style_params.presets)


def _as_the_endpoint_refuses(params, refused: ParamError, maxima: dict[str, float]) -> None:
    """What not even a job may ask is refused as the predictions endpoint refuses it, word for word: its own
    refusal of the same parameter, where it has one (it checks against a direct request's maxima)."""
    try:
        parse_params(params, maxima=maxima)
    except ParamError as direct:
        if direct.field == refused.field:
            raise direct from None


class ServerDescription:
    """The limits of the TorchServe the jobs go to, read again now and then (see the module's doc)."""

    def __init__(self, describe):
        """`describe`: an async callable returning the model's description (TorchServeClient.describe)."""
        self.describe = describe
        self.limits = ServerLimits()
        self.read = False

    async def refresh_forever(self) -> None:
        failing = False
        while True:
            try:
                limits = ServerLimits.from_description(await self.describe())
                if limits != self.limits:
                    logger.info("jobs: checking submits against TorchServe's limits: %s", limits)
                self.limits, self.read, failing = limits, True, False
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, LookupError, TypeError) as error:
                (logger.debug if failing else logger.warning)(
                    "jobs: cannot read TorchServe's model description (%s); checking submits against %s", error,
                    "what it said last" if self.read else "the engine's own bounds")
                failing = True
            await asyncio.sleep(DESCRIBE_EVERY_SECONDS if self.read else DESCRIBE_RETRY_SECONDS)

