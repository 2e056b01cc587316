"""What the worker answers when something no check foresaw fails: out of memory is the request's 507, a bug its
500, and a device that no longer runs work a 503 for every request left, after which the worker ends and
TorchServe starts a new one (style_transfer_handler.py)."""

import logging
from typing import Callable

import torch

from telemetry import CallTelemetry

logger = logging.getLogger(__name__)

DEVICE_FAILED = {"code": 503, "type": "DeviceFailure", "field": None,
                 "message": "the worker's device failed and cannot recover; a new worker is starting: send the "
                            "request again"}
OUT_OF_MEMORY = {"code": 507, "type": "OutOfMemory", "field": "size",
                 "message": "the device ran out of memory for this request; try a smaller size or fewer style images"}
INTERNAL_ERROR = {"code": 500, "type": "InternalError", "field": None,
                  "message": "the optimisation failed unexpectedly; the server log has the details"}
STAGE_WORDS = {"prepare": "reading this request", "encode": "encoding this request's answer"}
CPU_ALLOCATION_FAILED = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def unexpected_failure(call: CallTelemetry, index: int, error: Exception, stage: str) -> dict:
    """The error object for an exception no check foresaw while preparing or encoding request `index`
    (`stage`): out of memory is 507 and counted as such, anything else a 500. Logged with its traceback."""
    request_id = call.context.request_ids[index]
    if is_out_of_memory(error):
        logger.error("style_transfer: out of memory at stage %s for request %s: %r", stage, request_id, error)
        call.out_of_memory(index, stage=stage)
        return {**OUT_OF_MEMORY, "field": "size" if stage == "encode" else None,
                "message": f"the worker ran out of memory while {STAGE_WORDS[stage]}; try smaller images, a "
                           f"smaller size or fewer styles"}
    logger.exception("style_transfer: request %s failed at stage %s", request_id, stage)
    call.internal_error(index, stage=stage)
    return {**INTERNAL_ERROR, "message": f"the request failed unexpectedly while {STAGE_WORDS[stage]}; the "
                                         f"server log has the details"}


def guarded(run: Callable[[], list], requests: int, device: torch.device, works: Callable[[], bool]) -> list:
    """What `run` returns (the engine's results for `requests` requests), or for each of them the error
    object of the failure it raised (run_failure; `works` tells whether the device still works)."""
    try:
        return run()
    except Exception as error:
        failure = run_failure(error, requests, device, works)
    # Only here, after the except block, are the exception and the step's tensors its traceback held gone,
    # so that the allocator's cache can be handed back.
    if failure is OUT_OF_MEMORY and device.type == "cuda":
        torch.cuda.empty_cache()
    return [failure] * requests


def run_failure(error: Exception, requests: int, device: torch.device, works: Callable[[], bool]) -> dict:
    """The error object for each of the `requests` of a batch whose optimisation raised `error`: out of memory
    (507), a bug (500, the worker stays), or DEVICE_FAILED where the device no longer works. Logged."""
    if is_out_of_memory(error):
        logger.error("style_transfer: out of memory for %d request(s): %s", requests, str(error))
        return OUT_OF_MEMORY
    logger.error("style_transfer: optimisation failed", exc_info=error)  # not the client's fault
    if works():
        return INTERNAL_ERROR  # a bug: answer 500, keep the worker
    logger.critical("style_transfer: %s no longer works; this worker ends once it has answered and TorchServe "
                    "starts a new one", device)
    return DEVICE_FAILED


def is_out_of_memory(error: Exception) -> bool:
    """CUDA raises torch.OutOfMemoryError; torch's CPU allocator a RuntimeError that only its message tells."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in CPU_ALLOCATION_FAILED))


def device_works(device: torch.device) -> bool:
    """Whether the device still runs work after a failure. Some CUDA errors (a device-side assert, an
    illegal memory access) leave the process's CUDA context unusable: every later call fails as well, and
    only a new process recovers. A tiny computation read back tells."""
    if device.type != "cuda":
        return True
    try:
        torch.ones(1, device=device).add_(1).cpu()
        torch.cuda.synchronize(device)
    except Exception:  # whatever the error, the device cannot be trusted with another request
        return False
    return True
