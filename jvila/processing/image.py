"""Open images from any source a user hands over, and turn them into SigLIP pixel arrays.

Loading: a path (or "file://" URL), raw bytes, a file object, a `data:` URL or a PIL image. Every
failure (missing, unreadable, truncated, zero-size) is a `MediaError` naming the source. Remote
URLs are refused rather than fetched: nothing here touches the network.

Colour: `to_rgb` is PIL's `convert("RGB")`, as NVlabs/VILA's `process_image` (llava/mm_utils.py)
does before any tiling or processing: an alpha channel is dropped, not composited. (transformers
5's own `convert_to_rgb` composites onto white; VILA never reaches it with a non-RGB image.)

Preprocessing (`SiglipPreprocessor`) reproduces transformers' `SiglipImageProcessor` step for step,
configured from a checkpoint's preprocessor_config.json: PIL resize to (height, width) with the
configured resample filter (PIL returns an unchanged copy when the size already matches), then
`uint8 -> float64 * rescale_factor -> float32`, then `(x - mean) / std` in float32. The output is
NHWC float32 (transformers returns NCHW; jvila's vision tower takes channels last).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import os
import pathlib
import urllib.parse
from collections.abc import Iterable
from typing import Any, BinaryIO, Union

import numpy as np
import PIL.Image

from jvila.processing.errors import MediaError

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO, PIL.Image.Image]

# transformers' SiglipImageProcessor defaults (IMAGENET_STANDARD_MEAN/STD, BICUBIC, 224 square).
_SIGLIP_DEFAULTS: dict[str, Any] = {
    "size": {"height": 224, "width": 224},
    "resample": int(PIL.Image.Resampling.BICUBIC),
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}


def read_data_url(url: str) -> bytes:
    """The payload of a `data:[<type>][;base64],<data>` URL (RFC 2397)."""
    header, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma:
        raise MediaError(f"malformed data URL (expected 'data:<type>;base64,<data>'): {_preview(url)}")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"data URL has invalid base64 content ({e}): {_preview(url)}") from None
    return urllib.parse.unquote_to_bytes(payload)


def local_path(text: str) -> pathlib.Path:
    """A filesystem path from a plain path or a file:// URL; remote URLs are refused."""
    if text.startswith("file://"):
        return pathlib.Path(urllib.parse.unquote(text[len("file://") :]))
    if text.startswith(("http://", "https://")):
        raise MediaError(f"remote URLs are not fetched; download the file and pass its path: {_preview(text)}")
    return pathlib.Path(text)


def load_image(source: ImageSource) -> PIL.Image.Image:
    """A fully decoded PIL image (its original mode) from a path, bytes, file object, data URL or PIL image."""
    if isinstance(source, PIL.Image.Image):
        image, name = source, "the given PIL image"
    elif isinstance(source, (bytes, bytearray)):
        image, name = _open(io.BytesIO(bytes(source)), "image bytes"), "image bytes"
    elif isinstance(source, str) and source.startswith("data:"):
        image, name = _open(io.BytesIO(read_data_url(source)), "data URL"), "data URL"
    elif isinstance(source, (str, os.PathLike)):
        path = local_path(os.fspath(source))
        if not path.is_file():
            raise MediaError(f"image file not found: {path}")
        image, name = _open(path, str(path)), str(path)
    elif hasattr(source, "read"):
        image, name = _open(source, "image stream"), "image stream"
    else:
        raise MediaError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes, "
                         "a data: URL or a PIL image")
    try:
        # PIL decodes lazily; load() is where truncated or corrupt pixel data surfaces.
        image.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise MediaError(f"cannot decode image {name}: {e}") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(f"image {name} has zero size ({image.width}x{image.height})")
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB as VILA makes it: PIL's convert (alpha dropped, palettes expanded, grey replicated)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(source: ImageSource) -> PIL.Image.Image:
    return to_rgb(load_image(source))


def _open(fp, name: str) -> PIL.Image.Image:
    try:
        return PIL.Image.open(fp)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        # UnidentifiedImageError is an OSError: not an image format PIL knows, or an empty file.
        raise MediaError(f"cannot read image {name}: {e}") from None


def _preview(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclasses.dataclass(frozen=True)
class SiglipPreprocessor:
    """transformers' SiglipImageProcessor as plain NumPy; `size` is (height, width)."""

    size: tuple[int, int] = (224, 224)
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"preprocessor size must be a positive (height, width), got {self.size}")
        if int(self.resample) not in {int(r) for r in PIL.Image.Resampling}:
            raise ValueError(f"unknown PIL resample filter {self.resample}")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)}")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain zeros, got {self.image_std}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SiglipPreprocessor:
        """From a preprocessor_config.json dict; missing keys take SiglipImageProcessor's defaults."""
        if config.get("do_center_crop"):
            raise ValueError("preprocessor configs with do_center_crop are not SigLIP's; unsupported")
        merged = _SIGLIP_DEFAULTS | {k: v for k, v in config.items() if v is not None}
        size = merged["size"]
        if isinstance(size, int):  # very old configs give a single side
            size = {"height": size, "width": size}
        if not (isinstance(size, dict) and "height" in size and "width" in size):
            raise ValueError(f"preprocessor size must give height and width, got {size!r}")
        return cls(
            size=(int(size["height"]), int(size["width"])),
            resample=int(merged["resample"]),
            do_resize=bool(merged["do_resize"]),
            do_rescale=bool(merged["do_rescale"]),
            rescale_factor=float(merged["rescale_factor"]),
            do_normalize=bool(merged["do_normalize"]),
            image_mean=_three(merged["image_mean"], "image_mean"),
            image_std=_three(merged["image_std"], "image_std"),
            do_convert_rgb=bool(merged["do_convert_rgb"]),
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "image_processor_type": "SiglipImageProcessor",
            "size": {"height": self.size[0], "width": self.size[1]},
            "resample": int(self.resample),
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": self.do_convert_rgb,
        }

    def with_size(self, height: int, width: int | None = None) -> SiglipPreprocessor:
        return dataclasses.replace(self, size=(height, height if width is None else width))

    def __call__(self, images: PIL.Image.Image | Iterable[PIL.Image.Image]) -> np.ndarray:
        """Pixel values [n, height, width, 3] float32 (n = 1 for a single image)."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        arrays = [self._one(image) for image in images]
        if not arrays:
            raise MediaError("no images to preprocess")
        return np.stack(arrays)

    def _one(self, image: PIL.Image.Image) -> np.ndarray:
        if not isinstance(image, PIL.Image.Image):
            raise MediaError(f"the preprocessor takes PIL images, got a {type(image).__name__}")
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif image.mode != "RGB":
            raise MediaError(f"image mode {image.mode!r} is not RGB and do_convert_rgb is off")
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image)
        if self.do_rescale:
            # float64 product then float32, as transformers' `rescale` does, so values match bit for bit.
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            pixels = (pixels - mean) / std
        return pixels


def _three(values, name: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {values}")
    return values
