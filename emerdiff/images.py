"""Image input: any path, PIL image or array -> RGB float tensor; sizes both ways.

How images are sized: the model sees the image resized (bicubic, aspect ratio
*not* kept, as in the paper) to ``resolution x resolution``. Labels computed at
that resolution are mapped back to the original (height, width) with nearest
neighbour, so every returned label map has the input's size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIZE = 64  # smaller images have less than one latent pixel per 16x16 token cell
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class ImageError(ValueError):
    """An input image cannot be used; the message says why and how to fix it."""


def _from_pil(img: Image.Image, where: str) -> np.ndarray:
    img = ImageOps.exif_transpose(img)  # phones store rotation in EXIF
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "I;16N"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit greyscale: PIL reports 'I;16' or 'I' (32-bit int container)
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(arr / peak, 0, 1)
        return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("RGBA", "LA", "PA") or img.mode in ("RGBA", "LA"):
        # Transparent pixels have no colour: composite on white, as viewers show them.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _from_array(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[2] not in (1, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, 2)  # accept channel-first arrays
    if a.shape[2] not in (1, 3, 4):
        raise ImageError(f"image array must have 1, 3 or 4 channels, got shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if not np.isfinite(f).all():
            raise ImageError("image array contains NaN or infinite values")
        if f.min() < -1e-3 or f.max() > 1 + 1e-3:
            raise ImageError(
                f"float image values must lie in [0, 1], got [{f.min():.3g}, {f.max():.3g}]; "
                "divide by 255 (8-bit) or 65535 (16-bit) first"
            )
        f = np.clip(f, 0, 1)
    else:
        raise ImageError(f"unsupported image dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    elif f.shape[2] == 4:
        alpha = f[..., 3:]
        f = f[..., :3] * alpha + (1.0 - alpha)  # composite on white
    return f


def load_image(image: ImageInput, min_size: int = MIN_SIZE) -> torch.Tensor:
    """Load an image as an RGB float tensor of shape (3, H, W) with values in [0, 1].

    Accepts a file path, a PIL image, a numpy array (HxW, HxWxC; uint8, uint16 or
    float in [0, 1]) or a tensor (CxHxW or HxWxC). Greyscale is repeated to RGB,
    alpha is composited on white, palette images are expanded, 16-bit images are
    scaled by 65535, and EXIF orientation is applied.

    Raises:
        ImageError: missing, empty, corrupt or non-image file; unsupported array;
            image smaller than ``min_size`` pixels on a side.
    """
    where = "image"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        where = str(path)
        if not path.exists():
            raise ImageError(f"image file {path} does not exist; check the path")
        if path.is_dir():
            raise ImageError(f"{path} is a folder, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(f"image file {path} is empty (0 bytes); re-export or re-download it")
        try:
            with Image.open(path) as img:
                img.load()  # decode now so truncated files fail here, not later
                arr = _from_pil(img, where)
        except Image.DecompressionBombError as err:
            raise ImageError(
                f"image {path} is too large to decode safely ({err}); downscale it first"
            ) from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ImageError(
                f"cannot read {path} as an image ({type(err).__name__}: {err}); "
                "the file is corrupt, truncated or not an image (PNG/JPEG/TIFF/... expected)"
            ) from err
    elif isinstance(image, Image.Image):
        arr = _from_pil(image, where)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
            t = t.permute(1, 2, 0)
        arr = _from_array(t.numpy())
    elif isinstance(image, np.ndarray):
        arr = _from_array(image)
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}; pass a path, PIL image, numpy array or tensor"
        )
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise ImageError(
            f"{where} is {w}x{h} pixels; EmerDiff needs at least {min_size} px on each side. "
            "Upscale it first or use a larger image."
        )
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def to_model_input(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, R, R) in [-1, 1], resized bicubically (aspect not kept)."""
    x = image[None].float()
    if x.shape[-2:] != (resolution, resolution):
        # antialias matters when shrinking large photos
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1)


def resize_labels(labels: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to (height, width)."""
    t = torch.as_tensor(np.asarray(labels))
    if tuple(t.shape) == tuple(size):
        return t.numpy().astype(np.int64)
    out = F.interpolate(t[None, None].float(), size=size, mode="nearest-exact")
    return out[0, 0].round().long().numpy()
