"""Discovery by content and the raster loader on the generated real-world corpus, plus property tests:
random bytes, shapes, modes and bit depths give a readable image or an ImageLoadError, nothing else."""
import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image as PILImage

from tests.corpus import SIZE, make_corpus, quantise, synthetic_radiograph
from vlm.images import (DEFAULT_MAX_PIXELS, MIN_SIDE, ImageLoadError, LoadOptions, discover, load_image,
                        parse_window, printable_path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


def rel(root: Path, entry) -> str:
    return printable_path(os.path.relpath(str(entry), root))


def test_discovery_accounts_for_every_entry(corpus):
    root, expected = corpus
    found = discover([root])
    images = {rel(root, p) for p in found.images}
    skipped = {rel(root, e): reason for e, reason in found.skipped}
    assert not images & set(skipped)
    for entry, exp in expected.items():
        if exp.outcome == "scored":
            assert entry in images, entry
        elif exp.outcome == "failed":
            # found as an image candidate (the loader names the problem) or skipped with the reason here
            assert entry in images or exp.reason in skipped.get(entry, ""), (entry, skipped.get(entry))
    assert found.not_images == sum(e.outcome == "not_image" for e in expected.values()) == 4
    # every file the scan met is accounted for: found, listed, counted, or the link to a file already found
    met = {rel(root, Path(d) / f) for d, dirs, files in os.walk(root) for f in files + dirs}
    unaccounted = met - images - set(skipped) - {"linked_folder", "dicom"}  # folders scanned
    assert len(unaccounted) == found.not_images + found.duplicates, unaccounted
    assert found.duplicates == 1 and "grey8.png" in images and "file_link.png" not in images


def test_content_decides_not_the_suffix(corpus):
    root, _ = corpus
    found = {rel(root, p) for p in discover([root]).images}
    for entry in ("bmp_without_suffix", "jpeg_named.dat", "dicom/IM000017", "dicom/bare_dataset_no_preamble"):
        assert entry in found
        assert load_image(root / entry).pixels.shape[2] == 3
    assert load_image(root / "png_named.jpg").original_mode == "L"


def test_not_recursive_and_follow_symlinks(corpus):
    root, _ = corpus
    flat = discover([root], recursive=False)
    assert not any("/" in rel(root, p) for p in flat.images)
    assert flat.folders_not_scanned == 3  # dicom/, linked_folder/ and folder_named.png/ (listed as well)
    assert any(rel(root, e) == "folder_named.png" for e, _ in flat.skipped)
    followed = discover([root], follow_symlinks=True)
    assert not any(rel(root, e) == "dir_link" for e, _ in followed.skipped)
    assert followed.duplicates == 2  # dir_link/linked.png is linked_folder/linked.png


def test_symlink_loop_into_an_ancestor_is_listed(tmp_path):
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True)
    PILImage.fromarray(quantise(synthetic_radiograph(0), 8)).save(d / "x.png")
    os.symlink(tmp_path / "a", d / "up")
    found = discover([tmp_path], follow_symlinks=True)
    assert [p.name for p in found.images] == ["x.png"]
    assert [(Path(e).name, "loop" in r) for e, r in found.skipped] == [("up", True)]


def test_explicit_inputs_and_patterns(tmp_path, corpus):
    root, _ = corpus
    found = discover([tmp_path / "missing.png", str(tmp_path / "nothing*.png"), str(root / "grey[18]*.png")])
    assert [p.name for p in found.images] == ["missing.png", "grey16.png", "grey8.png"]
    assert found.skipped == [(str(tmp_path / "nothing*.png"), "no file matches this pattern")]
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("name", ["grey8.png", "grey16.png", "rgb.jpg", "rgba.png", "palette.png", "grey_alpha.png",
                                  "cmyk.jpg", "grey16.tif", "float32.tif", "bilevel.png", "photo.webp",
                                  "film.jp2"])
def test_raster_modes_read_to_rgb_uint8(corpus, name):
    root, _ = corpus
    im = load_image(root / name)
    assert im.pixels.dtype == np.uint8 and im.pixels.shape == (SIZE, SIZE, 3)
    assert im.pixels.std() > 20 and not im.warnings
    if name not in ("rgba.png",):
        assert np.abs(im.pixels[..., 0].astype(int) - im.pixels[..., 2]).max() <= 3  # grey stays grey (CMYK too)


def test_high_bit_depth_uses_its_real_range(corpus):
    root, _ = corpus
    for name in ("grey16.png", "grey16.tif", "float32.tif"):  # 12-bit values offset by 1000; 16-bit; float
        px = load_image(root / name).pixels
        assert px.min() == 0 and px.max() == 255, name
    raw = np.asarray(PILImage.open(root / "grey16.png")).astype(float)
    expect = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    assert np.abs(load_image(root / "grey16.png").pixels[..., 0] - expect).max() <= 1


def test_exif_orientation_and_first_frame(corpus):
    root, _ = corpus
    rotated = load_image(root / "exif_rotated.jpg")
    assert rotated.pixels.shape[:2] == (SIZE, SIZE // 2 + 16)  # stored landscape, shown portrait
    first = load_image(root / "grey8.png").pixels
    for name in ("animated.gif", "multipage.tif"):
        im = load_image(root / name)
        assert "3 frames: only the first" in im.warnings[0]
        assert np.abs(im.pixels.astype(int) - first).mean() < 2
        with pytest.raises(ImageLoadError, match="3 frames"):
            load_image(root / name, multiframe="refuse")


def test_size_limits_are_documented_and_overridable(corpus, tmp_path):
    root, expected = corpus
    assert MIN_SIDE == 32 and DEFAULT_MAX_PIXELS == 64_000_000
    with pytest.raises(ImageLoadError, match="too small .*minimum is 32 px"):
        load_image(root / "tiny.png")
    with pytest.raises(ImageLoadError, match="900,000,000 px, over the limit of 64,000,000 px .*--max-pixels"):
        load_image(root / "bomb.png")
    with pytest.raises(ImageLoadError, match="over the limit of 1,000 px"):
        load_image(root / "grey8.png", max_pixels=1000)
    assert load_image(root / "tiny.png", min_side=8).size == (12, 12)
    for entry, exp in expected.items():
        if exp.outcome == "failed" and (root / entry).is_file() and not (root / entry).is_symlink():
            with pytest.raises(ImageLoadError) as e:
                load_image(root / entry)
            assert exp.reason in e.value.reason and str(root / entry) in str(e.value), (entry, e.value.reason)


def test_unreadable_and_vanishing_files(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    src = tmp_path / "gone.png"
    src.write_bytes((root / "grey8.png").read_bytes())
    found = discover([tmp_path])
    src.unlink()  # deleted between the scan and the read
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(found.images[0])

    import vlm.images as images

    def denied(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(images, "_read_head", denied)  # root can read anything, so simulate the permission
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_image(root / "grey8.png")
    assert discover([root / "README", str(root / "READ*")]).skipped == [(str(root / "README"), "permission denied")]


def test_parse_window():
    assert parse_window("40,400") == (40.0, 400.0) and parse_window(" -600 , 1500 ") == (-600.0, 1500.0)
    for bad in ("40", "a,b", "40,0", "40,-3"):
        with pytest.raises(ValueError, match="window"):
            parse_window(bad)
    assert LoadOptions().window is None


# ----------------------------------------------------------------------------- property tests

PROPERTY = settings(max_examples=40, deadline=None, database=None,  # no .hypothesis/ folder in the work tree
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_loader_error(path, **kw):
    try:
        im = load_image(path, **kw)
    except ImageLoadError as e:
        assert e.reason and str(path) in str(e)
        return None
    assert im.pixels.dtype == np.uint8 and im.pixels.ndim == 3 and im.pixels.shape[2] == 3
    return im


@PROPERTY
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00",
                                                             b"BM", b"GIF89a", bytes(128) + b"DICM", b"\x08\x00"]),
       suffix=st.sampled_from(["", ".png", ".dcm", ".jpg", ".tif", ".bin"]))
def test_random_bytes_only_raise_the_loader_error(tmp_path, data, prefix, suffix):
    p = tmp_path / f"random{suffix}"
    p.write_bytes(prefix + data)
    _load_or_loader_error(p)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "La", "RGBa", "LAB", "HSV"]
FORMATS = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "GIF": ".gif", "JPEG": ".jpg", "WEBP": ".webp"}


@PROPERTY
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)), w=st.integers(1, 80),
       h=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_random_modes_shapes_and_formats(tmp_path, mode, fmt, w, h, seed):
    rng = np.random.default_rng(seed)
    base = PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    try:
        im = base.convert(mode) if mode not in ("I;16", "La", "RGBa") else base.convert("L").convert(mode)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # PIL cannot write this mode in this format: nothing to read
    p = tmp_path / f"img{FORMATS[fmt]}"
    p.write_bytes(buf.getvalue())
    out = _load_or_loader_error(p)
    assert (out is not None) == (min(w, h) >= MIN_SIDE)  # every mode PIL writes is read; only tiny ones refused


@PROPERTY
@given(bits=st.sampled_from([(8, 8), (8, 5), (16, 16), (16, 12), (16, 10), (16, 1)]), signed=st.booleans(),
       mono1=st.booleans(), slope=st.sampled_from([None, 1.0, 0.5, -2.0, 0.0]), window=st.sampled_from(
           [None, ([40], [400]), ([0], [0]), ([100], [-5]), ([1e30], [1e-30]), ([40, 60], [400, 0])]),
       shape=st.tuples(st.integers(1, 70), st.integers(1, 70)), seed=st.integers(0, 2**16))
def test_random_dicom_bit_depths_and_lookups(tmp_path, bits, signed, mono1, slope, window, shape, seed):
    from tests.corpus import dicom_dataset, save_dicom

    allocated, stored = bits
    grey = np.random.default_rng(seed).random(shape)
    extra = {"RescaleSlope": slope, "RescaleIntercept": -100} if slope is not None else {}
    if window is not None:
        extra |= {"WindowCenter": window[0], "WindowWidth": window[1]}
    ds = dicom_dataset(quantise(grey, stored, signed).astype(("i" if signed else "u") + str(allocated // 8)),
                       bits_allocated=allocated, bits_stored=stored, signed=signed,
                       photometric="MONOCHROME1" if mono1 else "MONOCHROME2", **extra)
    from pydicom import config

    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # hostile values are the point
    try:
        p = save_dicom(ds, tmp_path / "random.dcm")
    finally:
        config.settings.writing_validation_mode = old
    out = _load_or_loader_error(p)
    # odd windows and slopes fall back to the real range (with a warning): only tiny images are refused
    assert (out is not None) == (min(shape) >= MIN_SIDE)
