"""A request's images decoded, within what one call of the handler may decode: decoding is work that no time
budget interrupts, so each upload's size is read from its header and taken from the call's budget before any
pixel is decoded (handler.max_decoded_pixels_per_call)."""

from request_parsing import RawRequest, declared_pixels, style_part_name
from style_engine.codec import decode_image, decode_mask
from style_engine.errors import TooLargeError
from style_engine.params import StyleParams
from style_engine.presets import PresetLibrary
from style_engine.targets import StyleJob


class NoTimeLeft(Exception):
    """A request this call has no time left for: answered 503 with Retry-After, not the client's fault."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DecodingBudget:
    """The pixels one call of the handler may still decode (handler.max_decoded_pixels_per_call)."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def take(self, pixels: int) -> None:
        """Take a request's declared pixels; TooLargeError (413) if it alone is over the limit, NoTimeLeft
        (503) if the requests before it in this call have used what it needs."""
        if pixels > self.limit:
            raise TooLargeError("content", f"the images of this request declare {pixels} pixels together; at most "
                                           f"{self.limit} are decoded for one request: send smaller images")
        if pixels > self.left:
            raise NoTimeLeft("the requests that arrived with this one have used what this call may decode")
        self.left -= pixels


def decode_request(request: RawRequest, params: StyleParams, presets: PresetLibrary, max_pixels: int,
                   budget: DecodingBudget) -> StyleJob:
    """The request's StyleJob: its uploads' declared pixels taken from `budget`, then its images decoded."""
    budget.take(declared_pixels(request, max_pixels))
    return decode_job(request, params, presets, max_pixels)


def decode_job(request: RawRequest, params: StyleParams, presets: PresetLibrary, max_pixels: int) -> StyleJob:
    """The request's images decoded, its presets' images after its uploaded styles. Raises ParamError for an
    unknown preset (before any image is decoded), ImageError or TooLargeError naming the part at fault."""
    named = presets.images(params.presets)
    content = decode_image(request.content, "content", max_pixels=max_pixels)
    uploads = tuple(decode_image(data, style_part_name(i + 1), max_pixels=max_pixels)
                    for i, data in enumerate(request.styles))
    masks = tuple(decode_mask(data, f"mask_{i + 1}", max_pixels=max_pixels) for i, data in enumerate(request.masks))
    init_image = None if request.init_image is None else decode_image(request.init_image, "init_image",
                                                                      max_pixels=max_pixels)
    return StyleJob(content, uploads + named, params, masks, init_image)
