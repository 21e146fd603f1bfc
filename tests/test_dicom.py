"""DICOM pixels as a radiologist would see them: LUTs, windows, MONOCHROME1, bit depths, compressed
transfer syntaxes, multi-frame, and the three view fields (defined terms only)."""
import numpy as np
import pytest
from PIL import Image as PILImage

from tests.conftest import needs_shared_data
from tests.corpus import (SIZE, dicom_dataset, jpeg_dicom, quantise, save_dicom, source_pixels,
                          synthetic_radiograph, voi_lut_dicom)
from vlm.images import ImageLoadError, load_image, scale_to_uint8

GREY = synthetic_radiograph(3)


def grey_of(path, **kw):
    im = load_image(path, **kw)
    assert im.pixels.dtype == np.uint8 and im.pixels.shape[2] == 3
    assert (im.pixels[..., 0] == im.pixels[..., 2]).all()
    return im.pixels[..., 0].astype(int)


def write(tmp_path, name, bits=16, compress=None, bare=False, **kw):
    signed = kw.get("signed", False)
    ds = dicom_dataset(quantise(GREY, bits, signed), bits_allocated=8 if bits == 8 else 16, bits_stored=bits,
                       uid_seed=name, **kw)
    return save_dicom(ds, tmp_path / name, compress=compress, bare=bare)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_native_bit_depths_use_the_real_range(tmp_path, bits):
    q = quantise(GREY, bits).astype(float)  # no window in the file: its real min..max becomes 0..255
    assert np.array_equal(grey_of(write(tmp_path, f"b{bits}.dcm", bits)), scale_to_uint8(q))


def test_monochrome1_is_inverted(tmp_path):
    mono2 = grey_of(write(tmp_path, "m2.dcm", 12))
    mono1 = grey_of(write(tmp_path, "m1.dcm", 12, photometric="MONOCHROME1"))
    assert np.array_equal(mono1, 255 - mono2)
    inverse = grey_of(write(tmp_path, "inv.dcm", 12, PresentationLUTShape="INVERSE"))
    assert np.array_equal(inverse, 255 - mono2)  # DX pairs MONOCHROME1 with INVERSE: still one inversion
    assert np.array_equal(grey_of(write(tmp_path, "m1i.dcm", 12, photometric="MONOCHROME1",
                                        PresentationLUTShape="INVERSE")), 255 - mono2)


def linear_window(x, c, w):
    return np.round(np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) * 255)


def test_rescale_then_first_window_then_override(tmp_path):
    p = write(tmp_path, "ct.dcm", 12, signed=True, RescaleSlope=2, RescaleIntercept=-1024,
              WindowCenter=[-200, 40], WindowWidth=[1500, 400])
    hu = quantise(GREY, 12, signed=True).astype(float) * 2 - 1024
    assert np.abs(grey_of(p) - linear_window(hu, -200, 1500)).max() <= 1  # the first window by default
    assert np.abs(grey_of(p, window=(40, 400)) - linear_window(hu, 40, 400)).max() <= 1
    assert not np.array_equal(grey_of(p), grey_of(p, window=(40, 400)))


def test_window_functions_and_bad_widths(tmp_path):
    p = write(tmp_path, "sig.dcm", 16, WindowCenter=30000, WindowWidth=20000, VOILUTFunction="SIGMOID")
    x = quantise(GREY, 16).astype(float)
    assert np.abs(grey_of(p) - np.round(255 / (1 + np.exp(-4 * (x - 30000) / 20000)))).max() <= 1
    bad = write(tmp_path, "bad.dcm", 16, WindowCenter=100, WindowWidth=0)
    assert "window width is not positive" in load_image(bad).warnings[0]
    assert np.array_equal(grey_of(bad), scale_to_uint8(quantise(GREY, 16)))


def test_voi_lut_sequence(tmp_path):
    p = voi_lut_dicom(GREY, tmp_path / "voi.dcm")
    table = (np.linspace(0, 1, 4096) ** 0.7 * 65535).astype(np.uint16)
    expect = np.round(table[quantise(GREY, 12)] / 65535 * 255)
    assert np.abs(grey_of(p) - expect).max() <= 1


def test_bits_above_bits_stored_are_ignored(tmp_path):
    clean = grey_of(write(tmp_path, "clean.dcm", 12))
    ds = dicom_dataset(quantise(GREY, 12), bits_stored=12)
    ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") | np.uint16(0xF000)).tobytes()
    assert np.array_equal(grey_of(save_dicom(ds, tmp_path / "overlay.dcm")), clean)
    signed = dicom_dataset(quantise(GREY, 12, signed=True), bits_stored=12, signed=True)
    raw = np.frombuffer(signed.PixelData, "<i2") & np.int16(0x0FFF)  # two's complement in 12 bits, high bits 0
    signed.PixelData = raw.astype("<i2").tobytes()
    assert np.array_equal(grey_of(save_dicom(signed, tmp_path / "signed12.dcm")), clean)


def test_rgb_planar_configuration(tmp_path):
    rgb = np.dstack([quantise(GREY, 8), quantise(GREY[::-1], 8), quantise(GREY[:, ::-1], 8)])
    a = load_image(save_dicom(dicom_dataset(rgb, bits_allocated=8, photometric="RGB", planar=0), tmp_path / "p0.dcm"))
    b = load_image(save_dicom(dicom_dataset(rgb, bits_allocated=8, photometric="RGB", planar=1), tmp_path / "p1.dcm"))
    assert np.array_equal(a.pixels, rgb) and np.array_equal(b.pixels, rgb)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "DeflatedExplicitVRLittleEndian"])
def test_lossless_syntaxes_equal_the_native_pixels(tmp_path, syntax):
    import pydicom.uid

    native = grey_of(write(tmp_path, "native.dcm", 12))
    uid = getattr(pydicom.uid, syntax)
    if syntax.startswith("Deflated"):
        ds = dicom_dataset(quantise(GREY, 12), bits_stored=12)
        ds.file_meta.TransferSyntaxUID = uid
        p = save_dicom(ds, tmp_path / "c.dcm")
    else:
        p = write(tmp_path, "c.dcm", 12, compress=uid)
    assert load_image(p).original_mode == "DICOM MONOCHROME2"
    assert np.array_equal(grey_of(p), native)


def test_jpeg_baseline_no_suffix_and_bare_datasets(tmp_path):
    native = grey_of(write(tmp_path, "native.dcm", 8))
    jpeg = grey_of(jpeg_dicom(GREY, tmp_path / "jpeg.dcm"))  # lossy: close, not equal
    assert np.abs(jpeg - native).mean() < 6 and np.corrcoef(jpeg.ravel(), native.ravel())[0, 1] > 0.95
    assert np.array_equal(grey_of(write(tmp_path, "IM0001", 8)), native)
    assert np.array_equal(grey_of(write(tmp_path, "bare", 8, bare=True)), native)
    assert (tmp_path / "bare").read_bytes()[128:132] != b"DICM"


def test_unsupported_syntax_and_missing_decoder_are_named(tmp_path, monkeypatch):
    from pydicom.encaps import encapsulate

    ds = dicom_dataset(quantise(GREY, 8), bits_allocated=8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    p = save_dicom(ds, tmp_path / "h264.dcm")
    with pytest.raises(ImageLoadError, match=r"MPEG-4 AVC/H.264 .*\(1.2.840.10008.1.2.4.102\), which vlm-xray "
                                             r"cannot decode"):
        load_image(p)

    import pydicom.pixels

    class Unavailable:
        is_available = False

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(ImageLoadError, match=r"JPEG 2000 .*no installed decoder .*pip install pylibjpeg"):
        load_image(write(tmp_path, "j2k.dcm", 12, compress=pydicom.uid.JPEG2000Lossless))


def test_multiframe_first_frame_or_refuse(tmp_path):
    frames = np.stack([quantise(GREY, 16), quantise(GREY[::-1], 16)])
    ds = dicom_dataset(frames[0], frames=2)
    ds.PixelData = frames.astype("<u2").tobytes()
    p = save_dicom(ds, tmp_path / "mf.dcm")
    im = load_image(p)
    assert im.warnings == ["DICOM file has 2 frames: only the first was read"]
    assert np.array_equal(im.pixels[..., 0], scale_to_uint8(frames[0]))
    with pytest.raises(ImageLoadError, match="2 frames; multi-frame inputs are refused"):
        load_image(p, multiframe="refuse")


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.valuerep")  # writing the free-text values below
def test_view_fields_are_defined_terms_and_flag_what_does_not_fit(tmp_path):
    chest = {"label_modality": "chest radiograph"}
    pa = load_image(write(tmp_path, "pa.dcm", view="PA", body_part="CHEST", laterality="L"), **chest)
    assert (pa.view, pa.body_part, pa.laterality, pa.warnings) == ("PA", "CHEST", "L", [])
    assert pa.result_info() == {"input_warnings": [], "laterality": "L", "body_part": "CHEST"}
    lat = load_image(write(tmp_path, "ll.dcm", view="LL"), **chest)
    assert lat.view == "LL" and "lateral view" in lat.warnings[0]
    knee = write(tmp_path, "knee.dcm", view="AP", body_part="KNEE")
    assert load_image(knee, **chest).warnings == ["body part KNEE does not fit the label set (chest radiograph)"]
    assert "body part KNEE" in load_image(knee, label_modality="musculoskeletal radiograph").warnings[0]
    hand = write(tmp_path, "hand.dcm", view="LL", body_part="HAND")
    assert load_image(hand, label_modality="musculoskeletal radiograph").warnings == []  # laterals are normal there
    free = load_image(write(tmp_path, "free.dcm", view="SMITH^JOHN", body_part="Thorax of J. Smith"), **chest)
    assert free.view is None and free.body_part is None
    assert free.warnings == ["the DICOM view position is not a defined term and was not used",
                             "the DICOM body part is not a defined term and was not used"]


def test_no_pixel_data_and_tiny_dicoms(tmp_path):
    ds = dicom_dataset(quantise(GREY, 16))
    del ds.PixelData
    with pytest.raises(ImageLoadError, match="no pixel data"):
        load_image(save_dicom(ds, tmp_path / "DICOMDIR"))
    tiny = dicom_dataset(quantise(GREY[:16, :16], 16))
    with pytest.raises(ImageLoadError, match="too small"):
        load_image(save_dicom(tiny, tmp_path / "tiny.dcm"))
    big = dicom_dataset(quantise(GREY, 16))
    big.Rows = big.Columns = 40000  # declared size checked before any pixel is decoded
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(save_dicom(big, tmp_path / "big.dcm"))


def test_shared_sample_dicom_reads_with_its_view():
    dcm = next(needs_shared_data("samples").glob("*.dcm"))  # a JPEG-baseline SIIM chest film
    im = load_image(dcm)
    assert im.view == "PA" and im.body_part == "CHEST" and im.pixels.std() > 20 and not im.header


def test_dicoms_made_from_shared_chest_images_keep_their_content(tmp_path):
    src = needs_shared_data("nih14-lowres")
    f = sorted(src.glob("*.jpg"))[0]
    with PILImage.open(f) as im:
        grey = np.asarray(im.convert("L"), np.float64) / 255.0
    import pydicom.uid

    for name, kw in {"mono1_j2k.dcm": dict(photometric="MONOCHROME1", compress=pydicom.uid.JPEG2000Lossless),
                     "rle16.dcm": dict(compress=pydicom.uid.RLELossless)}.items():
        ds = dicom_dataset(quantise(grey, 12), bits_stored=12, photometric=kw.get("photometric", "MONOCHROME2"))
        out = grey_of(save_dicom(ds, tmp_path / name, compress=kw["compress"])) / 255.0
        out = 1 - out if "mono1" in name else out
        assert np.corrcoef(out.ravel(), grey.ravel())[0, 1] > 0.999
    assert len(source_pixels(2, SIZE)) == 2


def test_palette_colour(tmp_path):
    idx = quantise(GREY, 8)
    ds = dicom_dataset(idx, bits_allocated=8, photometric="PALETTE COLOR")
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit entries
    for colour, table in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", np.zeros(256, np.uint16))):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.tobytes())
    im = load_image(save_dicom(ds, tmp_path / "palette.dcm"))
    assert im.original_mode == "DICOM PALETTE COLOR"
    assert np.array_equal(im.pixels[..., 0], idx) and np.array_equal(im.pixels[..., 1], 255 - idx)
    assert (im.pixels[..., 2] == 0).all()
