"""Image normalisation shared by the encoder, the indexing jobs and the service."""

from __future__ import annotations

from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)
# A model's preprocessing resizes the shortest side to its input size and keeps the centre square, so a
# 100000 x 1 strip would first become a 22 M x 224 image (15 GB). Beyond this ratio the centre is cut first;
# the square the model sees lies inside that centre, so its pixels are the same.
MAX_ASPECT = 8


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL image: EXIF orientation applied, transparency composited on white.

    A plain ``convert("RGB")`` drops alpha and exposes whatever colour sits under transparent pixels
    (often black), which changes what the model sees for icons, logos and emoji.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits first
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def model_view(image: Image.Image) -> Image.Image:
    """What a model's preprocessing is given: :func:`to_rgb`, then at most ``MAX_ASPECT``:1 (centre kept)."""
    rgb = to_rgb(image)
    width, height = rgb.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return rgb
    keep_w, keep_h = min(width, MAX_ASPECT * height), min(height, MAX_ASPECT * width)
    left, top = (width - keep_w) // 2, (height - keep_h) // 2
    return rgb.crop((left, top, left + keep_w, top + keep_h))


def refused_pixels(error: Image.DecompressionBombError) -> int | None:
    """How many pixels the image PIL refused to open had (PIL says it only in its message), or None."""
    words = [word.strip("(),") for word in str(error).split()]
    numbers = [int(word) for word in words if word.isdigit()]
    return numbers[0] if numbers else None
