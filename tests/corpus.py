"""A generated corpus of real-world inputs: good rasters in every odd mode, DICOMs of every kind the
loader claims to read, hostile files and folder entries. Nothing binary is committed; every file is
made here, from the shared chest images when present (../shared/data/nih14-lowres), else from
synthetic pixels.

    python -m tests.corpus OUT_DIR        # write the mixed folder (and print what each entry should give)

`make_corpus(root)` returns {relative entry (as `printable_path` shows it): Expect}, the outcome a batch must give for each entry:
"scored" (a report; maybe with an input warning), "failed" (in errors.csv, reason containing `reason`)
or "not_image" (only counted in the summary).
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from vlm.images import printable_path

SHARED_CHEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih14-lowres"
SIZE = 64  # px; above the loader's minimum side, small enough to keep batches fast


@dataclass(frozen=True)
class Expect:
    outcome: str  # "scored" | "failed" | "not_image"
    reason: str = ""  # substring of the errors.csv reason (failed) or of an input warning (scored)


# ----------------------------------------------------------------------------- pixels

def synthetic_radiograph(seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Chest-like grey pixels in [0, 1]: bright body, two darker lung fields, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 - 0.35 * (((xx - 0.32) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    img = img - 0.35 * (((xx - 0.68) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    return np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)


def source_pixels(n: int, size: int = SIZE) -> list[np.ndarray]:
    """`n` grey images in [0, 1]: shared chest radiographs (resized) when present, else synthetic."""
    files = sorted(SHARED_CHEST.glob("*.jpg"))[:n] if SHARED_CHEST.is_dir() else []
    out = []
    for f in files:
        with PILImage.open(f) as im:
            out.append(np.asarray(im.convert("L").resize((size, size), PILImage.BILINEAR), np.float64) / 255.0)
    out += [synthetic_radiograph(seed, size) for seed in range(len(out), n)]
    return out


def quantise(grey01: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """[0, 1] -> integers using the full range of `bits` stored bits (signed: centred on 0)."""
    top = (1 << bits) - 1
    q = np.round(grey01 * top).astype(np.int64)
    if signed:
        q -= 1 << (bits - 1)
    dtype = {8: np.int8 if signed else np.uint8}.get(bits, np.int16 if signed else np.uint16) if bits <= 16 else np.int32
    return q.astype(dtype)


# ----------------------------------------------------------------------------- DICOM

def dicom_dataset(pixels: np.ndarray, *, bits_allocated: int = 16, bits_stored: int | None = None,
                  signed: bool = False, photometric: str = "MONOCHROME2", planar: int = 0, frames: int = 1,
                  view: str | None = "PA", body_part: str | None = "CHEST", laterality: str | None = None,
                  uid_seed: str = "vlm-xray-test", **elements):
    """A DX DICOM dataset around integer `pixels` (H, W) grey or (H, W, 3) RGB (native transfer syntax)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for keyword, value in (("ViewPosition", view), ("BodyPartExamined", body_part), ("ImageLaterality", laterality)):
        if value is not None:
            setattr(ds, keyword, value)
    rgb = pixels.ndim == 3
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if rgb:
        ds.PlanarConfiguration = planar
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    data = pixels.transpose(2, 0, 1) if rgb and planar else pixels
    dtype = {8: "u1", 16: "u2", 32: "u4"}[bits_allocated]
    dtype = ("<i" if signed else "<u") + dtype[1]
    ds.PixelData = np.ascontiguousarray(np.broadcast_to(data, (frames, *data.shape)), dtype=dtype).tobytes()
    return ds


def save_dicom(ds, path: Path, compress: str | None = None, bare: bool = False) -> Path:
    """Write `ds`: with preamble + file meta (default), compressed with a transfer syntax UID, or bare
    (no preamble, no file meta, implicit VR) as some archives store them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        ds.compress(compress, generate_instance_uid=False)
    if bare:
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_dicom(grey01: np.ndarray, path: Path) -> Path:
    """8-bit JPEG baseline DICOM (the common lossy archive syntax): PIL encodes, pydicom encapsulates."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    PILImage.fromarray(quantise(grey01, 8)).save(buf, format="JPEG", quality=92)
    ds = dicom_dataset(quantise(grey01, 8), bits_allocated=8, uid_seed=path.name)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return save_dicom(ds, path)


def voi_lut_dicom(grey01: np.ndarray, path: Path) -> Path:
    """12-bit data with a VOI LUT Sequence (a gamma-like table) instead of a window."""
    from pydicom.dataset import Dataset

    ds = dicom_dataset(quantise(grey01, 12), bits_stored=12, uid_seed=path.name)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    table = (np.linspace(0, 1, 4096) ** 0.7 * 65535).astype(np.uint16)
    item.LUTData = table.tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = [item]
    return save_dicom(ds, path)


# ----------------------------------------------------------------------------- planted identifiers

PHI_MARKERS = ("ZQX", "SECRETNAME", "424242", "18990417", "1899-04-17", "077Y")
_KEEP = {"SpecificCharacterSet", "PhotometricInterpretation", "VOILUTFunction", "PresentationLUTShape",
         "ViewPosition", "BodyPartExamined", "ImageLaterality", "Laterality", "TransferSyntaxUID"}


def _marker(vr: str, n: int) -> str:
    return {"PN": f"ZQX{n:04d}^SECRETNAME", "DA": "18990417", "TM": "235917.424242", "DT": "18990417235917.424242",
            "AS": "077Y", "UI": f"1.2.999.424242.{n}", "UR": f"http://zqx{n:04d}.example/"}.get(vr, f"ZQX{n:04d}")


def plant_identifiers(ds) -> None:
    """Put a findable identifier (PHI_MARKERS) in every standard text element (all ~1,600 of them, except
    the few that say how to decode the pixels and the three view fields), a private block and a nested
    sequence, as a hostile archive file would carry them."""
    from pydicom.datadict import DicomDictionary
    from pydicom.dataset import Dataset

    for n, (tag, (vr, _vm, _name, retired, keyword)) in enumerate(sorted(DicomDictionary.items())):
        if retired or not keyword or keyword in _KEEP or (tag >> 16) in (0x0000, 0x0002, 0x7FE0) or vr not in (
                "PN", "LO", "SH", "ST", "LT", "UT", "UC", "DA", "TM", "DT", "AS", "AE", "CS", "UI", "UR"):
            continue
        if (tag >> 16) == 0x0028 and vr not in ("LO", "LT", "ST", "UT"):
            continue  # pixel-module codes (CS/UI) decide how pixels decode; their free-text fields are planted
        ds.add_new(tag, vr, _marker(vr, n))
    block = ds.private_block(0x0011, "ZQX PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", "ZQX-PRIVATE-VALUE")
    other = Dataset()
    other.PatientID = "ZQX-SEQ-ID"
    other.IssuerOfPatientID = "ZQX-SEQ-ISSUER"
    ds.OtherPatientIDsSequence = [other]


def save_planted(ds, path: Path, **kwargs) -> Path:
    from pydicom import config

    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        plant_identifiers(ds)
        return save_dicom(ds, path, **kwargs)
    finally:
        config.settings.writing_validation_mode = old


# ----------------------------------------------------------------------------- rasters

def png_with_declared_size(path: Path, width: int, height: int) -> Path:
    """A small valid PNG whose header claims width x height (a decompression-bomb shape)."""
    buf = io.BytesIO()
    PILImage.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def exif_rotated_jpeg(grey01: np.ndarray, path: Path) -> Path:
    """A landscape JPEG whose EXIF orientation (6: rotate 90 CW) makes it portrait when shown."""
    im = PILImage.fromarray(quantise(grey01[: SIZE // 2 + 16, :], 8))
    exif = PILImage.Exif()
    exif[0x0112] = 6
    im.save(path, format="JPEG", exif=exif.tobytes())
    return path


def _rasters(root: Path, px: list[np.ndarray]) -> dict[str, Expect]:
    g8 = [quantise(p, 8) for p in px]
    rgb = np.repeat(g8[2][:, :, None], 3, axis=2)
    PILImage.fromarray(g8[0]).save(root / "grey8.png")
    PILImage.fromarray((quantise(px[1], 12).astype(np.uint16) + 1000)).save(root / "grey16.png")
    PILImage.fromarray(rgb).save(root / "rgb.jpg", quality=90)
    PILImage.fromarray(np.dstack([rgb, np.full(g8[3].shape, 200, np.uint8)])).save(root / "rgba.png")
    PILImage.fromarray(g8[4]).convert("P").save(root / "palette.png")
    PILImage.fromarray(g8[5]).convert("LA").save(root / "grey_alpha.png")
    PILImage.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    PILImage.fromarray(quantise(px[6], 16)).save(root / "grey16.tif")
    PILImage.fromarray(px[7].astype(np.float32)).save(root / "float32.tif")
    PILImage.fromarray(g8[0]).convert("1").save(root / "bilevel.png")
    exif_rotated_jpeg(px[1], root / "exif_rotated.jpg")
    frames = [PILImage.fromarray(g) for g in g8[:3]]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(root / "multipage.tif", save_all=True, append_images=frames[1:])
    PILImage.fromarray(rgb).save(root / "photo.webp")
    PILImage.fromarray(g8[5]).save(root / "film.jp2")
    PILImage.fromarray(g8[2]).save(root / "bmp_without_suffix", format="BMP")
    PILImage.fromarray(g8[3]).save(root / "png_named.jpg", format="PNG")
    PILImage.fromarray(g8[4]).save(root / "jpeg_named.dat", format="JPEG")
    return {n: Expect("scored") for n in (
        "grey8.png", "grey16.png", "rgb.jpg", "rgba.png", "palette.png", "grey_alpha.png", "cmyk.jpg", "grey16.tif",
        "float32.tif", "bilevel.png", "exif_rotated.jpg", "photo.webp", "film.jp2", "bmp_without_suffix", "png_named.jpg",
        "jpeg_named.dat")} | {"animated.gif": Expect("scored", "first"), "multipage.tif": Expect("scored", "first")}


def _dicoms(root: Path, px: list[np.ndarray]) -> dict[str, Expect]:
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

    d = root / "dicom"
    d.mkdir()
    ds = lambda i, bits, name, **kw: dicom_dataset(quantise(px[i], bits, kw.get("signed", False)),  # noqa: E731
                                                   bits_allocated=8 if bits == 8 else 16, bits_stored=bits,
                                                   uid_seed=name, **kw)
    save_dicom(ds(0, 16, "mono2_16bit"), d / "mono2_16bit.dcm")
    save_dicom(ds(1, 12, "mono1_12bit", photometric="MONOCHROME1"), d / "mono1_12bit.dcm")
    save_dicom(ds(2, 8, "mono2_8bit"), d / "mono2_8bit.dcm")
    save_dicom(ds(3, 12, "signed_windowed", signed=True, RescaleSlope=2, RescaleIntercept=-1024,
                  WindowCenter=[-1024, 40], WindowWidth=[4000, 400]), d / "signed_windowed.dcm")
    voi_lut_dicom(px[4], d / "voi_lut.dcm")
    noisy = ds(5, 12, "overlay_bits")
    arr = np.frombuffer(noisy.PixelData, "<u2") | np.uint16(0xA000)  # junk above BitsStored (old overlays)
    noisy.PixelData = arr.tobytes()
    save_dicom(noisy, d / "overlay_bits.dcm")
    rgb = np.repeat(quantise(px[6], 8)[:, :, None], 3, axis=2)
    save_dicom(dicom_dataset(rgb, bits_allocated=8, photometric="RGB", planar=1, uid_seed="rgb"), d / "rgb_planar.dcm")
    save_dicom(ds(7, 16, "rle"), d / "rle.dcm", compress=RLELossless)
    save_dicom(ds(0, 12, "j2k"), d / "j2k.dcm", compress=JPEG2000Lossless)
    jpeg_dicom(px[1], d / "jpeg_baseline.dcm")
    deflated = ds(2, 16, "deflated")
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    save_dicom(deflated, d / "deflated.dcm")
    save_dicom(ds(3, 16, "multiframe", frames=3), d / "multiframe.dcm")
    save_dicom(ds(4, 16, "no_suffix"), d / "IM000017")
    save_dicom(ds(5, 16, "bare"), d / "bare_dataset_no_preamble", bare=True)
    save_dicom(ds(6, 16, "lateral", view="LL"), d / "lateral.dcm")
    save_dicom(ds(7, 16, "knee", body_part="KNEE", view="AP"), d / "knee.dcm")
    return {f"dicom/{n}": Expect("scored") for n in (
        "mono2_16bit.dcm", "mono1_12bit.dcm", "mono2_8bit.dcm", "signed_windowed.dcm", "voi_lut.dcm",
        "overlay_bits.dcm", "rgb_planar.dcm", "rle.dcm", "j2k.dcm", "jpeg_baseline.dcm", "deflated.dcm", "IM000017",
        "bare_dataset_no_preamble")} | {
        "dicom/multiframe.dcm": Expect("scored", "first"), "dicom/lateral.dcm": Expect("scored", "lateral"),
        "dicom/knee.dcm": Expect("scored", "body part KNEE")}


def _bad_dicoms(root: Path, px: list[np.ndarray]) -> dict[str, Expect]:
    from pydicom.encaps import encapsulate

    d = root / "dicom"
    no_pixels = dicom_dataset(quantise(px[0], 16), uid_seed="nopix")
    del no_pixels.PixelData
    save_dicom(no_pixels, d / "DICOMDIR")
    mpeg = dicom_dataset(quantise(px[1], 8), bits_allocated=8, uid_seed="mpeg")
    mpeg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264: no decoder exists
    mpeg.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(60)])
    mpeg["PixelData"].VR = "OB"
    mpeg["PixelData"].is_undefined_length = True
    save_dicom(mpeg, d / "video.dcm")
    short = dicom_dataset(quantise(px[2], 16), uid_seed="short")
    short.PixelData = short.PixelData[: len(short.PixelData) // 3]
    save_dicom(short, d / "truncated_pixels.dcm")
    (d / "header_only.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00")
    return {"dicom/DICOMDIR": Expect("failed", "no pixel data"), "dicom/video.dcm": Expect("failed", "MPEG-4"),
            "dicom/truncated_pixels.dcm": Expect("failed", "DICOM"), "dicom/header_only.dcm": Expect("failed", "DICOM")}


def _hostile(root: Path, px: list[np.ndarray]) -> dict[str, Expect]:
    g8 = quantise(px[0], 8)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    buf = io.BytesIO()
    PILImage.fromarray(g8).save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text_named.png").write_text("this is a text file with an image name\n")
    PILImage.fromarray(g8[:12, :12]).save(root / "tiny.png")
    png_with_declared_size(root / "bomb.png", 30_000, 30_000)
    (root / "random.bin").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "README").write_text("copied from the archive on 2024-01-02\n")
    folder = root / "folder_named.png"
    folder.mkdir()
    PILImage.fromarray(g8).save(folder / "inside.png")
    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    os.symlink("self_loop.png", root / "self_loop.png")
    (root / "linked_folder").mkdir()
    PILImage.fromarray(g8).save(root / "linked_folder" / "linked.png")
    os.symlink(root / "linked_folder", root / "dir_link")
    os.symlink(root / "grey8.png", root / "file_link.png")  # the same image twice: scored once
    odd_name = os.fsdecode(b"scan \xff from another encoding.png")  # not UTF-8: outputs show \xff
    PILImage.fromarray(g8).save(root / odd_name, format="PNG")
    PILImage.fromarray(g8[::-1]).save(root / "line\nbreak.png")
    os.mkfifo(root / "named_pipe")  # opening it would block a naive reader forever
    for name in ("notes.txt", "labels.csv", "meta.json", ".DS_Store"):
        (root / name).write_text("plainly not an image\n")
    out = {"corrupt.png": Expect("failed", "corrupt"), "truncated.jpg": Expect("failed", "truncated"),
           "empty.png": Expect("failed", "empty"), "text_named.png": Expect("failed", "not a recognised image"),
           "tiny.png": Expect("failed", "too small"), "bomb.png": Expect("failed", "over the limit"),
           "random.bin": Expect("failed", "not a recognised image"), "README": Expect("failed", "not a recognised"),
           "folder_named.png": Expect("failed", "folder"), "folder_named.png/inside.png": Expect("scored"),
           "broken_link.png": Expect("failed", "broken symbolic link"), "self_loop.png": Expect("failed", "loop"),
           "dir_link": Expect("failed", "--follow-symlinks"), "linked_folder/linked.png": Expect("scored"),
           printable_path(odd_name): Expect("scored"), "line\nbreak.png": Expect("scored"),
           "named_pipe": Expect("failed", "not a regular file")}
    out |= {n: Expect("not_image") for n in ("notes.txt", "labels.csv", "meta.json", ".DS_Store")}
    if os.geteuid() != 0:  # root reads any file, so a permission error cannot be made there
        PILImage.fromarray(g8).save(root / "unreadable.png")
        os.chmod(root / "unreadable.png", 0)
        out["unreadable.png"] = Expect("failed", "permission denied")
    return out


def make_corpus(root: str | Path) -> dict[str, Expect]:
    """Write the mixed folder under `root`; returns {entry relative to root: Expect}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    px = source_pixels(8)
    expected = _rasters(root, px)
    expected |= _dicoms(root, px)
    expected |= _bad_dicoms(root, px)
    expected |= _hostile(root, px)
    return expected


if __name__ == "__main__":  # pragma: no cover - a helper for people checking the loader by hand
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for entry, exp in sorted(make_corpus(target).items()):
        print(f"{exp.outcome:10} {entry}  {exp.reason}")
