"""The invisible watermark of the original scripts: the bytes of "StableDiffusionV1", embedded with
`invisible-watermark`'s dwtDct method (https://github.com/ShieldMnt/invisible-watermark)."""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

WATERMARK = b"StableDiffusionV1"
METHOD = "dwtDct"
MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images


class Watermarker:
    """Puts the watermark into PIL images. Images too small to carry it are left as they are; the first one is
    reported at `small_image_level`: a warning where the user chose the size, debug where every image is small
    by design (the demo model's 32x32)."""

    def __init__(self, content: bytes = WATERMARK, small_image_level: int = logging.WARNING):
        from imwatermark import WatermarkEncoder

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", content)
        self.small_image_level = small_image_level
        self._reported = False

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.width * image.height < MIN_PIXELS:
            if not self._reported:
                logger.log(self.small_image_level, "%dx%d images are too small to carry the invisible watermark "
                           "(it needs 256x256 pixels); saving them without it", image.width, image.height)
                self._reported = True
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        encoded = self.encoder.encode(bgr, METHOD)
        return Image.fromarray(np.ascontiguousarray(encoded[:, :, ::-1]))


def read_watermark(image: Image.Image, length: int = len(WATERMARK)) -> bytes:
    """The `length` watermark bytes that dwtDct finds in `image`."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", 8 * length)
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    return bytes(decoder.decode(bgr, METHOD))
