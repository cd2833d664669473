"""Image input: any path, PIL image or array -> RGB float tensor; sizes both ways.

How images are sized: the model sees the image resized (bicubic, aspect ratio
*not* kept, as in the paper) to ``resolution x resolution``. Labels computed at
that resolution are mapped back to the original (height, width) with nearest
neighbour, so every returned label map has the input's size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIZE = 64  # smaller images have less than one latent pixel per 16x16 token cell
# Input size limit: decoding and mapping labels back to the original size cost about
# BYTES_PER_PIXEL bytes per input pixel (float copies, int64 label maps, overlay), so
# 50 MP (a large phone photo) needs ~4.5 GB. Override with EMERDIFF_MAX_PIXELS.
MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "EMERDIFF_MAX_PIXELS"
BYTES_PER_PIXEL = 90
ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


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
        # 32-bit float (TIFF): same rule as a float array, never a silent clip
        grey = _check_float(np.asarray(img, dtype=np.float32), where)
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


def _check_float(f: np.ndarray, where: str) -> np.ndarray:
    """Float pixels must be finite and in [0, 1] (a rounding margin is clipped)."""
    if not np.isfinite(f).all():
        raise ImageError(f"{where} contains NaN or infinite values; fix or re-export the image")
    if f.min() < -1e-3 or f.max() > 1 + 1e-3:
        raise ImageError(
            f"{where}: float image values must lie in [0, 1], got [{f.min():.3g}, {f.max():.3g}]; "
            "divide by 255 (8-bit) or 65535 (16-bit) first, or rescale to [0, 1]"
        )
    return np.clip(f, 0, 1)


def max_pixels() -> int:
    """The input size limit in pixels: ``EMERDIFF_MAX_PIXELS`` if set, else :data:`MAX_PIXELS`."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None or not value.strip():
        return MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise ImageError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels, e.g. 100000000") from None
    if limit < 1:
        raise ImageError(f"{MAX_PIXELS_ENV}={value!r} must be a positive number of pixels")
    return limit


def check_pixels(width: int, height: int, where: str, limit: int | None = None) -> None:
    """Refuse an image above the pixel limit before it is decoded (it would need ~90 bytes per pixel)."""
    limit = max_pixels() if limit is None else limit
    if width * height > limit:
        need = width * height * BYTES_PER_PIXEL / 1e9
        raise ImageError(
            f"{where} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{limit / 1e6:.1f} MP (segmenting it would need about {need:.0f} GB of memory). Downscale it "
            f"(the model sees it at `resolution` px anyway) or raise the limit: {MAX_PIXELS_ENV}=N "
            "or load_image(..., max_pixels=N)"
        )


def _from_array(arr: np.ndarray) -> np.ndarray:
    a = np.asarray(arr)
    if a.size == 0:  # checked first: numpy's min/max of an empty array raise a bare ValueError
        raise ImageError(f"image array is empty (shape {a.shape}); pass an image of at least "
                         f"{MIN_SIZE}x{MIN_SIZE} pixels")
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
        f = _check_float(a.astype(np.float32), "image array")
    else:
        raise ImageError(f"unsupported image dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    elif f.shape[2] == 4:
        alpha = f[..., 3:]
        f = f[..., :3] * alpha + (1.0 - alpha)  # composite on white
    return f


def _tensor_to_numpy(image: torch.Tensor) -> np.ndarray:
    """A tensor as an HxWxC (or HxW) numpy array; float types numpy lacks (bfloat16, float8) become float32."""
    t = image.detach()
    if t.layout != torch.strided:
        raise ImageError(f"image tensor has layout {t.layout}; pass a dense tensor (tensor.to_dense())")
    t = t.cpu()
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        t = t.float()  # bfloat16 / float8: no numpy dtype; float32 holds their values exactly
    elif t.is_complex():
        raise ImageError(f"unsupported image tensor dtype {t.dtype}; use uint8, uint16 or float in [0, 1]")
    if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[2] not in (1, 3, 4):
        t = t.permute(1, 2, 0)
    try:
        return t.numpy()
    except (TypeError, RuntimeError) as err:  # a dtype numpy cannot hold (quantized, uint32 on old torch)
        raise ImageError(f"unsupported image tensor dtype {t.dtype} ({err}); use uint8, uint16 or float "
                         "in [0, 1]") from err


def load_image(image: ImageInput, min_size: int = MIN_SIZE, max_pixels: int | None = None) -> torch.Tensor:
    """Load an image as an RGB float tensor of shape (3, H, W) with values in [0, 1].

    Accepts a file path, a PIL image, a numpy array (HxW, HxWxC; uint8, uint16 or
    float in [0, 1]) or a tensor (CxHxW or HxWxC). Greyscale is repeated to RGB,
    alpha is composited on white, palette images are expanded, 16-bit images are
    scaled by 65535, and EXIF orientation is applied.

    Images above ``max_pixels`` (default :func:`max_pixels`: 50 megapixels, or
    the ``EMERDIFF_MAX_PIXELS`` environment variable) are refused before they
    are decoded.

    Raises:
        ImageError: missing, empty, corrupt or non-image file; unsupported array;
            float values outside [0, 1] or not finite; image smaller than
            ``min_size`` pixels on a side or larger than ``max_pixels``.
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
            with warnings.catch_warnings():
                # our own limit below replaces Pillow's DecompressionBombWarning
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(path)
            with img:
                check_pixels(*img.size, where, max_pixels)  # before decoding: the header has the size
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
        check_pixels(*image.size, where, max_pixels)
        arr = _from_pil(image, where)
    elif isinstance(image, torch.Tensor):
        arr = _from_array(_tensor_to_numpy(image))
    elif isinstance(image, np.ndarray):
        arr = _from_array(image)
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}; pass a path, PIL image, numpy array or tensor"
        )
    h, w = arr.shape[:2]
    check_pixels(w, h, where, max_pixels)
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


def resize_labels(labels: torch.Tensor | np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map to (height, width), sampling at pixel
    centres (torch's "nearest-exact"); exact for any integer values (no float round trip).
    The project's one label resizer: outputs, baselines, ground truth and evaluation all use it."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    h, w = arr.shape
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return arr.astype(np.int64)
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]].astype(np.int64)
