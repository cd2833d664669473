"""Image input edge cases and how sizes map both ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emerdiff import ImageError, load_image
from emerdiff.sd.images import resize_labels, to_model_input


def _rgb(h=80, w=120, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_file(tmp_path):
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert t.shape == (3, 80, 120) and t.dtype == torch.float32
    assert torch.allclose(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_grayscale(tmp_path):
    g = _rgb()[..., 0]
    Image.fromarray(g, mode="L").save(tmp_path / "g.png")
    t = load_image(tmp_path / "g.png")
    assert t.shape == (3, 80, 120)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.allclose(t[0], torch.from_numpy(g).float() / 255)
    assert load_image(g).shape == (3, 80, 120)  # 2-D array too


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((80, 80, 4), np.uint8)
    a[..., 0] = 255  # red
    a[:40, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(a, mode="RGBA").save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png")
    assert torch.allclose(t[:, 10, 10], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(t[:, 70, 10], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(load_image(a), t)


def test_palette(tmp_path):
    img = Image.fromarray(_rgb()).convert("P", palette=Image.ADAPTIVE, colors=16)
    img.save(tmp_path / "p.png")
    t = load_image(tmp_path / "p.png")
    assert torch.allclose(t, torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1).float() / 255)


def test_16bit_grey_file_and_array(tmp_path):
    arr = (np.linspace(0, 65535, 80 * 96).reshape(80, 96)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    t = load_image(tmp_path / "d.png")
    assert t.shape == (3, 80, 96)
    assert abs(float(t.max()) - 1.0) < 1e-6 and float(t.min()) == 0.0
    assert torch.allclose(t[0], torch.from_numpy(arr.astype(np.float32) / 65535), atol=1e-6)
    assert torch.allclose(load_image(np.stack([arr] * 3, -1)), t, atol=1e-6)


def test_exif_rotation(tmp_path):
    arr = _rgb(80, 120)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    t = load_image(tmp_path / "r.jpg")
    assert t.shape == (3, 120, 80)  # displayed orientation


def test_tensor_and_channel_first():
    arr = _rgb()
    t = load_image(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert t.shape == (3, 80, 120)
    assert load_image(np.moveaxis(arr, 2, 0)).shape == (3, 80, 120)


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("not an image at all"), "cannot read"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), "cannot read"),
])
def test_bad_files(tmp_path, make, match):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageError, match=match):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    Image.fromarray(_rgb(200, 200)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt, truncated"):
        load_image(tmp_path / "t.jpg")


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_too_small():
    with pytest.raises(ImageError, match="at least 64 px"):
        load_image(_rgb(63, 500))


@pytest.mark.parametrize("arr,match", [
    (np.full((80, 80, 3), 2.0, np.float32), r"\[0, 1\]"),
    (np.full((80, 80, 3), np.nan, np.float32), "NaN"),
    (np.zeros((80, 80, 5), np.uint8), "channels"),
    (np.zeros((2, 80, 80, 3), np.uint8), "shape"),
    (np.zeros((80, 80, 3), np.int64), "dtype"),
])
def test_bad_arrays(arr, match):
    with pytest.raises(ImageError, match=match):
        load_image(arr)


def test_unsupported_type():
    with pytest.raises(ImageError, match="unsupported image type"):
        load_image(42)


def test_model_input_and_labels_back():
    """Documented contract: resized (aspect not kept) to R x R in [-1, 1]; labels back by nearest."""
    img = load_image(_rgb(90, 300))
    x = to_model_input(img, 128)
    assert x.shape == (1, 3, 128, 128) and x.min() >= -1 and x.max() <= 1
    labels = torch.arange(4).repeat_interleave(32)[None].repeat(128, 1)  # 4 vertical stripes
    back = resize_labels(labels, (90, 300))
    assert back.shape == (90, 300)
    assert back[0, 0] == 0 and back[0, -1] == 3 and set(np.unique(back)) == {0, 1, 2, 3}
    # stripe widths scale with the image: 300/4 = 75 columns each
    assert abs(int((back[0] == 1).sum()) - 75) <= 1


def test_huge_image_is_downscaled(tmp_path):
    big = np.zeros((3000, 4000, 3), np.uint8)
    big[:, 2000:] = 255
    t = load_image(big)
    x = to_model_input(t, 64)
    assert x.shape == (1, 3, 64, 64)
    assert x[0, :, :, :30].max() < -0.99 and x[0, :, :, 34:].min() > 0.99


def test_resize_labels_is_torch_nearest_exact_and_keeps_large_ids():
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for shape, size in [((4, 4), (32, 32)), ((7, 5), (16, 23)), ((64, 48), (9, 10)), ((3, 3), (3, 3))]:
        labels = rng.integers(0, 50, size=shape)
        want = F.interpolate(torch.as_tensor(labels)[None, None].float(), size=size, mode="nearest-exact")
        got = resize_labels(labels, size)
        assert got.dtype == np.int64 and got.shape == size
        np.testing.assert_array_equal(got, want[0, 0].long().numpy())
        np.testing.assert_array_equal(resize_labels(torch.as_tensor(labels), size), got)
    big = np.array([[2**40 + 1, 3], [5, 2**40 + 7]])  # ids a float32 round trip would corrupt
    assert set(np.unique(resize_labels(big, (6, 6)))) == {2**40 + 1, 3, 5, 2**40 + 7}
