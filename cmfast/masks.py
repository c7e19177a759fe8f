"""Inpainting masks: 1 where the image is KNOWN (kept), 0 where the model fills in. Built-in shapes need no
files and no system font (the glyph uses the font bundled with Pillow); any image file works too."""

from __future__ import annotations


import numpy as np
import torch

SHAPES = ("box", "left-half", "right-half", "top-half", "bottom-half", "glyph:<letters>", "<image file>")


def box(size: int, fraction: float = 0.5) -> torch.Tensor:
    """A centred square hole covering `fraction` of the side."""
    mask = torch.ones(size, size)
    lo = round(size * (1 - fraction) / 2)
    hi = size - lo
    mask[lo:hi, lo:hi] = 0
    return mask


def half(size: int, keep: str = "left") -> torch.Tensor:
    """Keep one half of the image, fill the other."""
    mask = torch.zeros(size, size)
    h = size // 2
    region = {"left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None)),
              "top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None))}
    if keep not in region:
        raise ValueError(f"keep: expected one of {', '.join(region)}, got {keep!r}")
    mask[region[keep]] = 1
    return mask


def glyph(size: int, text: str = "S") -> torch.Tensor:
    """Fill the strokes of `text`, drawn large and centred with Pillow's bundled font (no system font)."""
    from PIL import Image, ImageDraw, ImageFont

    if not text:
        raise ValueError("text: expected at least one character")
    font = ImageFont.load_default(size=max(8, int(size * 0.9 / max(1, len(text)) * 1.3)))
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), text, font=font, fill=255)
    return torch.from_numpy((np.asarray(img) < 128).astype(np.float32))


def load(path, size: int) -> torch.Tensor:
    """A mask image: white (> 127) is known; resized (nearest) to size x size if needed."""
    from PIL import Image

    from .images import open_image

    with open_image(path, "mask") as opened:
        wide = opened.mode.startswith("I;16")
        img = Image.fromarray((np.asarray(opened) >> 8).astype(np.uint8)) if wide else opened.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))


def from_spec(spec: str, size: int) -> torch.Tensor:
    """box | left-half | right-half | top-half | bottom-half | glyph:TEXT | a path to a mask image."""
    if spec == "box":
        return box(size)
    if spec.endswith("-half"):
        return half(size, spec[: -len("-half")])
    if spec.startswith("glyph:"):
        return glyph(size, spec[len("glyph:"):])
    return load(spec, size)
