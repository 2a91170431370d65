"""Image loading and SigLIP preprocessing against transformers' SiglipImageProcessor (PIL backend)."""

from __future__ import annotations

import base64
import io
import urllib.parse

import numpy as np
import PIL.Image
import pytest
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from jvila.processing.errors import MediaError
from jvila.processing.image import SiglipPreprocessor, load_image, load_rgb, read_data_url

# NVILA's vision_tower/preprocessor_config.json, and a config that moves every knob off its default.
NVILA_CONFIG = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"height": 448, "width": 448},
}
ODD_CONFIG = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 2, "rescale_factor": 0.0041, "size": {"height": 37, "width": 53},
}


def _random_image(rng, width, height, mode="RGB") -> PIL.Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return PIL.Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def _png_bytes(image: PIL.Image.Image, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("config", [NVILA_CONFIG, ODD_CONFIG], ids=["nvila", "odd"])
def test_preprocessing_matches_transformers(config):
    rng = np.random.default_rng()
    reference = SiglipImageProcessorPil(**config)
    ours = SiglipPreprocessor.from_config(config)
    # Odd sizes, upscaling and downscaling, one already at the target size (PIL's no-op copy path).
    sizes = [(97, 61), (613, 449), (config["size"]["width"], config["size"]["height"]), (5, 1201)]
    images = [_random_image(rng, w, h) for w, h in sizes] + [_random_image(rng, 71, 33, "L")]
    ours_pixels = ours(images)
    expected = np.stack([
        np.moveaxis(reference(image, return_tensors="np")["pixel_values"][0], 0, -1) for image in images
    ])
    assert ours_pixels.dtype == np.float32
    assert ours_pixels.shape == (len(images), config["size"]["height"], config["size"]["width"], 3)
    # The same float64-then-float32 operations in the same order: equal bit for bit.
    np.testing.assert_array_equal(ours_pixels, expected)


def test_preprocessor_defaults_and_round_trip():
    defaults = SiglipPreprocessor.from_config({})
    reference = SiglipImageProcessorPil()
    assert defaults.size == (reference.size["height"], reference.size["width"])
    assert defaults.resample == int(reference.resample)
    assert defaults.image_mean == tuple(reference.image_mean)
    assert SiglipPreprocessor.from_config(SiglipPreprocessor.from_config(ODD_CONFIG).to_config()) == \
        SiglipPreprocessor.from_config(ODD_CONFIG)


def test_preprocessor_rejects_bad_configs():
    with pytest.raises(ValueError, match="height and width"):
        SiglipPreprocessor.from_config({"size": {"shortest_edge": 224}})
    with pytest.raises(ValueError, match="center_crop"):
        SiglipPreprocessor.from_config({"do_center_crop": True})
    with pytest.raises(ValueError, match="3 values"):
        SiglipPreprocessor.from_config({"image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="resample"):
        SiglipPreprocessor.from_config({"resample": 17})
    with pytest.raises(MediaError, match="PIL images"):
        SiglipPreprocessor()([np.zeros((4, 4, 3), np.uint8)])


def test_load_from_every_source(tmp_path):
    rng = np.random.default_rng()
    image = _random_image(rng, 23, 17)
    data = _png_bytes(image)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    expected = np.asarray(image)
    sources = [
        str(path), path, f"file://{path}", data, bytearray(data), io.BytesIO(data), image,
        "data:image/png;base64," + base64.b64encode(data).decode(),
        "data:image/png," + urllib.parse.quote_from_bytes(data),
    ]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(load_rgb(source)), expected)


def test_rgb_conversion_is_vilas_convert():
    rng = np.random.default_rng()
    rgba = _random_image(rng, 19, 11, "RGBA")
    # Alpha is dropped, not composited (VILA's image.convert("RGB")).
    np.testing.assert_array_equal(np.asarray(load_rgb(rgba)), np.asarray(rgba)[..., :3])
    grey = _random_image(rng, 9, 13, "L")
    np.testing.assert_array_equal(np.asarray(load_rgb(grey)), np.repeat(np.asarray(grey)[..., None], 3, -1))
    palette = grey.convert("P")
    assert load_image(palette).mode == "P" and load_rgb(palette).mode == "RGB"


def test_bad_images_are_media_errors(tmp_path):
    rng = np.random.default_rng()
    image = _random_image(rng, 64, 48)
    for fmt in ("PNG", "JPEG"):
        data = _png_bytes(image, fmt)
        truncated = tmp_path / f"cut.{fmt.lower()}"
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(MediaError, match=f"cannot decode image .*cut.{fmt.lower()}"):
            load_image(truncated)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match="cannot read image .*garbage.jpg"):
        load_image(str(garbage))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty.png"):
        load_image(empty)
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="zero size"):
        load_image(PIL.Image.new("RGB", (0, 7)))
    with pytest.raises(MediaError, match="remote URLs"):
        load_image("https://example.com/cat.png")
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@notbase64@@")
    with pytest.raises(MediaError, match="malformed data URL"):
        read_data_url("data:image/png;base64")
    with pytest.raises(MediaError, match="cannot read an image from a int"):
        load_image(7)
