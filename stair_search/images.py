"""Image normalisation shared by the encoder, the indexing jobs and the service."""

from __future__ import annotations

from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)


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


def refused_pixels(error: Image.DecompressionBombError) -> int | None:
    """How many pixels the image PIL refused to open had (PIL says it only in its message), or None."""
    words = [word.strip("(),") for word in str(error).split()]
    numbers = [int(word) for word in words if word.isdigit()]
    return numbers[0] if numbers else None
