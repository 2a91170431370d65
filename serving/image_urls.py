"""Images in chat messages, as OpenAI's format carries them: `data:` URLs with base64 content.

A client may name nothing but a `data:` URL holding an image: jvila's image loader also reads
paths and file:// URLs, which must never be reachable from the network, and the server fetches
nothing remote. The image is fully decoded here (by jvila.processing.image), so a truncated or
non-image payload is the client's 400, never a failure later inside the model.
"""

from __future__ import annotations

import re

import PIL.Image

from jvila.processing.errors import MediaError
from jvila.processing.image import load_image

MAX_IMAGE_BYTES = 20 * 2**20
_HEADER = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*),", re.DOTALL)


class ImageURLError(ValueError):
    """An image URL the server cannot use; the message says why."""


def decode_image_url(url: str) -> PIL.Image.Image:
    """A fully decoded image from a base64 `data:` URL."""
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url[:16] else "a path"
        raise ImageURLError(f"only data: URLs are accepted for images (got {scheme}); this server reads no files "
                            "and fetches nothing")
    header = _HEADER.match(url)
    if header is None:
        raise ImageURLError("malformed data: URL (expected data:image/<type>;base64,<data>)")
    mime = header["mime"] or "text/plain"
    if not mime.startswith("image/"):
        raise ImageURLError(f"the data: URL holds {mime}, not an image")
    if "base64" not in header["params"].split(";"):
        raise ImageURLError("image data: URLs must be base64-encoded (data:image/<type>;base64,...)")
    if (len(url) - header.end()) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ImageURLError(f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return load_image(url)
    except MediaError as e:
        raise ImageURLError(str(e)) from None
