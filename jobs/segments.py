"""A job's segments: each run sends the job's request with the last segment's checkpoint added, so that
TorchServe's worker goes on where the last segment stopped (handler/style_engine/segments.py).

The request is kept as it was submitted (a multipart body, or a JSON object): the checkpoint is spliced in as
it streams, before the multipart's closing boundary (a `checkpoint` file part) or the JSON object's closing
brace (a `checkpoint` key, base64), so that the stored request is never rewritten.
"""

import base64
import re
from typing import AsyncIterable, AsyncIterator

CHECKPOINT = "checkpoint"  # the part (or key) that carries it, and the name of its object among the job's
BOUNDARY = re.compile(r'boundary="?([^";]+)"?')


class NotSpliceable(ValueError):
    """The stored request does not end as its content type says it must."""


def with_checkpoint(chunks: AsyncIterable[bytes], size: int, content_type: str,
                    checkpoint: bytes) -> tuple[AsyncIterator[bytes], int]:
    """The request's bytes with `checkpoint` added, and their size."""
    boundary = BOUNDARY.search(content_type) if content_type.startswith("multipart/") else None
    if boundary:
        closing = f"--{boundary.group(1)}--\r\n".encode()
        added = (f"--{boundary.group(1)}\r\nContent-Disposition: form-data; name=\"{CHECKPOINT}\"; "
                 f"filename=\"{CHECKPOINT}\"\r\nContent-Type: application/x-style-checkpoint\r\n\r\n").encode()
        added += checkpoint + b"\r\n" + closing
    else:
        closing, added = b"}", f', "{CHECKPOINT}": "'.encode() + base64.b64encode(checkpoint) + b'"}'
    return _spliced(chunks, closing, added), size - len(closing) + len(added)


async def _spliced(chunks: AsyncIterable[bytes], closing: bytes, added: bytes) -> AsyncIterator[bytes]:
    held = b""  # the last len(closing) bytes read: the closing, once the stored body has all been read
    async for chunk in chunks:
        held += chunk
        if len(held) > len(closing):
            yield held[:-len(closing)]
            held = held[-len(closing):]
    if held != closing:
        raise NotSpliceable(f"the stored request does not end with {closing!r}")
    yield added
