"""The response fields (docs/api.md, "The answer") that every way of calling the engine shares."""

from .optimize import StyleResult


def result_fields(result: StyleResult, fmt: str) -> dict:
    """The `response=json` object without `image`: what the local client's --json prints too."""
    height, width = result.image.shape[-2:]
    return {
        "format": fmt,
        "width": width,
        "height": height,
        "steps": result.steps,
        "seconds": round(result.seconds, 4),
        "stop_reason": result.stop_reason,
        "precision": result.precision,
        "loss": {"initial": result.initial_loss, "final": result.final_loss},
    }
