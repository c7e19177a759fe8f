"""Image files: [-1, 1] tensors <-> uint8 (the reference's conversion), PNG grids, the reference's NPZ.
The writers write where they are told: commands give them cmfast.outputs temporaries, moved into place as a set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8: ((x + 1) * 127.5) clamped to [0, 255] and truncated."""
    return ((x.detach().float().cpu() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) or (H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.array(a, dtype=np.float32))
    t = t[None] if t.dim() == 3 else t
    return t.permute(0, 3, 1, 2) / 127.5 - 1


def grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 tiled into one (rows x columns) image with `pad` pixels of white between tiles."""
    b, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return out


def labelled_grid(rows: list[tuple[str, np.ndarray]], titles: list[str], zoom: int = 1, pad: int = 2) -> np.ndarray:
    """Rows of (label, (N, H, W, C) uint8 images) as one RGB picture: each row's label on its left, a title above
    each column, tiles enlarged `zoom` times (nearest neighbour), drawn with Pillow's bundled font (no system font)."""
    from PIL import Image, ImageDraw, ImageFont

    tiles = [(label, a.repeat(zoom, axis=1).repeat(zoom, axis=2)) for label, a in rows]
    h, w = tiles[0][1].shape[1:3]
    font = ImageFont.load_default(size=max(10, min(h // 3, 16)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(int(draw.textlength(label, font=font)) for label, _ in tiles) + 3 * pad
    title_h = max(12, min(h // 3, 16)) + 3 * pad
    columns = max(a.shape[0] for _, a in tiles)
    picture = Image.new("RGB", (label_w + columns * (w + pad) + pad, title_h + len(tiles) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(picture)
    for j, title in enumerate(titles[:columns]):
        x = label_w + j * (w + pad) + w / 2 - draw.textlength(title, font=font) / 2
        draw.text((x, pad), title, font=font, fill="black")
    for i, (label, a) in enumerate(tiles):
        top = title_h + i * (h + pad)
        draw.text((pad, top + h / 2), label, font=font, fill="black", anchor="lm")
        for j, tile in enumerate(a):
            rgb = np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile
            picture.paste(Image.fromarray(rgb), (label_w + j * (w + pad), top))
    return np.asarray(picture)


def open_image(path, what: str):
    """The PIL image of a file, decoded, or one clear error naming `what` and the file: a folder, a file that is no
    image, truncated data, pixels of more than 16 bits. Use as a context manager."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError:
        raise ValueError(f"{what}: {path} is not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"{what}: {path} cannot be read (truncated or corrupt?): {e}") from None
    if img.mode in ("I", "F"):
        img.close()
        raise ValueError(f"{what}: {path} has {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels; "
                         "cmfast reads 8-bit images and 16-bit grayscale")
    return img


def load_image(path, size: int | None = None, channels: int = 3) -> torch.Tensor:
    """An image file as (1, channels, H, W) in [-1, 1] (3: RGB, 1: grayscale), resized (bicubic) when size is given.
    8-bit images in any mode PIL converts (palette, grayscale, RGBA: alpha dropped, CMYK); 16-bit grayscale scaled
    from [0, 65535]; other modes (32-bit integer or float pixels) refused."""
    from PIL import Image

    with open_image(path, "image") as img:
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            wide = np.asarray(img, dtype=np.float64) / 65535.0  # 16-bit grayscale
            t = torch.from_numpy(wide).float()[None, None] * 2 - 1
            t = t.expand(1, channels, *t.shape[2:]).contiguous()
            return t if size is None else _resized(t, size)
        img = img.convert("RGB" if channels == 3 else "L")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    a = np.asarray(img)
    return from_uint8(a if a.ndim == 3 else a[..., None])


def _resized(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[-2:] == (size, size):
        return t
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def save_npz(path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """The reference's sample file: arr_0 uint8 NHWC, arr_1 the class labels (class-conditional models)."""
    arrays = [images] if labels is None else [images, labels]
    with open(path, "wb") as fh:  # a file object: np.savez would add .npz to a name without it
        np.savez(fh, *arrays)
