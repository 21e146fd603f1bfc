"""Reading radiographs and photos into one `Image` type, and finding them in folders by content.

Every reader returns 8-bit RGB pixels (H, W, 3) so that preprocessing variants and model
transforms see one format; any problem is an `ImageLoadError` naming the file and the reason.

Rasters (PNG, JPEG, TIFF, BMP, GIF, WebP, JPEG 2000; recognised by content, not by suffix): EXIF orientation
is applied; 16-bit/32-bit greyscale is scaled by its real range (min..max); palette, LA, RGBA,
CMYK and other modes become RGB (transparency composited on black); animated or multi-page files
give their first frame, with a warning.

DICOM (pydicom; compressed syntaxes through pylibjpeg, RLE natively): Modality LUT (rescale
slope/intercept), then the VOI LUT or the first window centre/width (or `window=(C, W)`),
MONOCHROME1 inverted; 8/12/16-bit, signed, BitsStored < BitsAllocated, planar configuration,
palette colour; multi-frame gives the first frame with a warning (or is refused with
`multiframe="refuse"`). Only ViewPosition, Laterality/ImageLaterality and BodyPartExamined are kept,
and only when they are DICOM defined terms; no other header value reaches the `Image`, a warning or
an error message unless `include_phi=True`.

Limits: images below `MIN_SIDE` px on a side are refused; above `max_pixels` (default
`DEFAULT_MAX_PIXELS`) they are refused before decoding (decompression-bomb guard).
"""
from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import re
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image as PILImage, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; the largest radiographs are ~4300 x 4300 (18.5 M)
MIN_SIDE = 32  # px; smaller images hold no readable anatomy at any model's input size
# vlm-xray enforces its own pixel limit (max_pixels) before decoding; PIL's global one would refuse
# images a user allowed with max_pixels and warn on others.
PILImage.MAX_IMAGE_PIXELS = None

RASTER_KINDS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WebP", "JPEG 2000")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2", ".j2k", ".jpx",
                  ".dcm", ".dicom", ".dic"}
# Files that are plainly not images: counted in a folder scan's summary, not listed as errors.
NOT_IMAGE_SUFFIXES = {".txt", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".md", ".rst", ".html", ".htm", ".yaml",
                      ".yml", ".log", ".ini", ".cfg", ".toml", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".rtf",
                      ".py", ".sh", ".bat", ".zip", ".gz", ".tgz", ".tar", ".7z", ".db", ".sqlite", ".npz", ".npy",
                      ".pt", ".safetensors", ".lnk", ".url", ".bak", ".tmp"}
NOT_IMAGE_NAMES = {"thumbs.db", "desktop.ini", ".ds_store"}
NOT_AN_IMAGE = "not a recognised image format (expected PNG, JPEG, TIFF, BMP, GIF, WebP, JPEG 2000 or DICOM)"

_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"), (b"BM", "BMP"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
          (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000")]


class ImageLoadError(Exception):
    """An input could not be read; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class LoadOptions:
    """How inputs are read; every field is a CLI option (see the batch/analyze help)."""

    window: tuple[float, float] | None = None  # DICOM (centre, width) instead of the file's own VOI
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # refuse larger images before decoding; None: no limit
    min_side: int = MIN_SIDE
    include_phi: bool = False  # keep identifying header values (and raw decoder messages) in outputs
    multiframe: str = "first"  # "first": first frame + warning; "refuse": an ImageLoadError
    label_modality: str | None = None  # the label set's modality, e.g. "chest radiograph": view/body-part fit


def parse_window(text: str) -> tuple[float, float]:
    """'C,W' (e.g. '40,400' or '-600,1500') -> (centre, width); ValueError naming the problem."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        centre, width = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"window {text!r}: expected CENTRE,WIDTH such as 40,400") from None
    if not width > 0 or not np.isfinite(centre):
        raise ValueError(f"window {text!r}: the width must be > 0 and the centre a number")
    return centre, width


@dataclass
class Image:
    pixels: np.ndarray  # uint8, (H, W, 3), RGB
    path: str
    id: str  # filesystem-safe, collision-free name derived from the path
    view: str | None = None  # DICOM ViewPosition (a defined term such as PA, AP, LL)
    original_mode: str = ""  # e.g. "L", "I;16", "RGBA", "DICOM MONOCHROME2"
    laterality: str | None = None  # DICOM Laterality / ImageLaterality: R, L, B, U
    body_part: str | None = None  # DICOM BodyPartExamined (a defined term such as CHEST)
    warnings: list[str] = field(default_factory=list)  # input warnings: first frame used, lateral view, ...
    header: dict[str, str] = field(default_factory=dict)  # identifying header values, only with include_phi
    # the three channels are one grey plane (decoded grey, or RGB with equal channels): variants and the
    # model transform then work on one plane, the same numbers for a third of the work
    is_grey: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def result_info(self) -> dict:
        """What of the input reaches a result: warnings and the DICOM view fields (header only with include_phi)."""
        info: dict = {"input_warnings": list(self.warnings)}
        if self.laterality:
            info["laterality"] = self.laterality
        if self.body_part:
            info["body_part"] = self.body_part
        if self.header:
            info["dicom_header"] = dict(self.header)
        return info


def safe_id(path: str | Path) -> str:
    """A file-name-safe id for an input path: readable stem + short hash of the full path.

    The hash keeps `a/x.png` and `b/x.png` apart; the character filter removes any path
    separators or markup so the id can be used as an output file name.
    """
    p = str(path)
    stem = Path(p).stem
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:60] or "image"
    digest = hashlib.sha1(p.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{clean}-{digest}"


def printable_path(path: str | Path) -> str:
    """A path as text every output can hold: bytes that are not UTF-8 (a name from another system's
    encoding) become \\xNN escapes instead of surrogates that no UTF-8 file or terminal can write."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------- content sniffing

def sniff(head: bytes) -> str | None:
    """The format named by a file's first 132 bytes: 'DICOM', a raster kind, or None."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


def looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM dataset written without the 128-byte preamble: it starts with a group 0002 or 0008 tag
    (little endian), explicit-VR (two capital letters) or implicit-VR (a small 4-byte length)."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 1024


def _read_head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(132)


def _os_reason(e: OSError, p: Path) -> str:
    if isinstance(e, FileNotFoundError):
        return "broken symbolic link (its target does not exist)" if p.is_symlink() else "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    return e.strerror or type(e).__name__


# ----------------------------------------------------------------------------- pixel scaling

def scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (default: the real min..max of the finite values) linearly onto 0..255."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8 and lo is None:
        return arr
    x = arr.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.nanmin(np.where(finite, x, np.nan)) if finite.any() else 0.0)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2 and arr.dtype == np.uint8:  # OpenCV's copy: ~10x faster than np.repeat (0.26 ms, 320 px)
        import cv2

        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2RGB)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] >= 3:
        return np.ascontiguousarray(arr[:, :, :3])
    raise ValueError(f"unsupported pixel array shape {arr.shape}")


def check_size(p: Path, width: int, height: int, opts: LoadOptions, frames: int = 1) -> None:
    """Refuse tiny images and decompression bombs before any pixel is decoded."""
    if width < opts.min_side or height < opts.min_side:
        raise ImageLoadError(p, f"image is too small ({width}x{height} px; the minimum is {opts.min_side} px a side)")
    if opts.max_pixels is not None and width * height > opts.max_pixels:
        raise ImageLoadError(p, f"image is {width}x{height} = {width * height:,} px, over the limit of "
                                f"{opts.max_pixels:,} px (raise it with --max-pixels)")


def first_frame_warning(p: Path, kind: str, n_frames: int, opts: LoadOptions) -> str:
    if opts.multiframe == "refuse":
        raise ImageLoadError(p, f"{kind} has {n_frames} frames; multi-frame inputs are refused (multiframe='refuse')")
    return f"{kind} has {n_frames} frames: only the first was read"


# ----------------------------------------------------------------------------- rasters

_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def _raster_array(im: PILImage.Image) -> np.ndarray:
    """Any PIL mode -> uint8 grey (H, W) or RGB (H, W, 3)."""
    mode = im.mode
    if mode in _HIGH_DEPTH_MODES:
        return scale_to_uint8(np.asarray(im))  # 16/32-bit grey: its real range, no metadata window exists
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if "A" in mode or "a" in mode or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        # composite transparency on black (radiograph background) rather than dropping alpha blindly
        rgba = im.convert("RGBA")
        bg = PILImage.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(PILImage.alpha_composite(bg, rgba).convert("RGB"))
    if mode == "1":
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # P, CMYK, YCbCr, LAB, HSV, I;16 variants PIL converts itself


def _read_raster(p: Path, kind: str, opts: LoadOptions) -> Image:
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught, PILImage.open(p) as im:
        warnings.simplefilter("always")  # e.g. corrupt EXIF: an input warning of this image, not stderr noise
        check_size(p, im.size[0], im.size[1], opts)
        mode = im.mode
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        if n_frames > 1:
            notes.append(first_frame_warning(p, f"{kind} file", n_frames, opts))
            im.seek(0)
        im.load()
        upright = ImageOps.exif_transpose(im)  # camera/scanner orientation tag applied
        arr = _raster_array(upright)
    notes += sorted({f"decoder warning: {w.message}" for w in caught})
    return Image(pixels=arr, path=str(p), id=safe_id(p), original_mode=mode, warnings=notes)


# ----------------------------------------------------------------------------- DICOM

# DICOM defined terms (PS3.3 / PS3.16 CID 4031). Only these values of the three view fields are kept:
# anything else (free text, possibly identifying) is dropped with a warning that does not repeat it.
VIEW_POSITIONS = {"AP", "PA", "LL", "RL", "LAT", "LATERAL", "RLD", "LLD", "RLO", "LLO", "RAO", "LAO", "RPO", "LPO",
                  "AXIAL", "OBLIQUE", "CC", "MLO", "ML", "LM", "LMO", "XCC", "XCCL", "XCCM", "FB", "SIO", "AT"}
FRONTAL_VIEWS = {"AP", "PA"}
LATERALITIES = {"R", "L", "B", "U"}
BODY_PARTS = {"SKULL", "HEAD", "BRAIN", "FACE", "JAW", "TMJ", "SINUS", "NECK", "CSPINE", "TSPINE", "LSPINE",
              "SSPINE", "COCCYX", "SPINE", "CHEST", "THORAX", "LUNG", "RIB", "RIBS", "HEART", "BREAST", "ABDOMEN",
              "PELVIS", "HIP", "SHOULDER", "CLAVICLE", "SCAPULA", "ARM", "HUMERUS", "ELBOW", "FOREARM", "WRIST",
              "HAND", "FINGER", "THUMB", "UPPEREXTREMITY", "EXTREMITY", "LEG", "FEMUR", "KNEE", "PATELLA", "TIBIA",
              "FIBULA", "ANKLE", "FOOT", "TOE", "HEEL", "LOWEREXTREMITY", "SKIN", "WHOLEBODY"}
# Which body parts fit a label set's modality (LabelSet.modality); other known parts are flagged.
BODY_PARTS_BY_MODALITY = {
    "chest radiograph": {"CHEST", "THORAX", "LUNG", "RIB", "RIBS", "HEART"},
    "musculoskeletal radiograph": {"SHOULDER", "CLAVICLE", "SCAPULA", "ARM", "HUMERUS", "ELBOW", "FOREARM", "WRIST",
                                   "HAND", "FINGER", "THUMB", "UPPEREXTREMITY", "EXTREMITY"},
    "dermoscopy": {"SKIN"},
}
PHOTOMETRICS = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "YBR_ICT",
                "YBR_RCT", "YBR_PARTIAL_420"}
# Identifying values kept (in Image.header) only with include_phi.
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "AccessionNumber",
                "StudyDate", "StudyTime", "StudyDescription", "SeriesDescription", "InstitutionName",
                "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE", "DA", "DT", "TM", "AS", "CS", "UI", "UN", "OB"}
# pydicom's own log records quote header values; they must not reach the application's log handlers.
logging.getLogger("pydicom").propagate = False


@contextmanager
def _quiet_pydicom():
    """Read leniently (archives hold non-conformant headers) and keep pydicom's warnings, which quote
    header values, out of stderr."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        config.settings.reading_validation_mode = old


def _values(value) -> list:
    """A DICOM element value as a list (multi-valued elements hold several)."""
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def header_values(ds) -> list[str]:
    """Every text value in the dataset (nested sequences too): what an error message must never quote."""
    out: set[str] = set()
    for elem in ds.iterall():
        if elem.VR not in _TEXT_VRS or elem.tag.group == 0x7FE0:
            continue
        for v in _values(elem.value):
            text = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
            if len(text) > 256:
                continue  # bulk binary data, not a value a decoder message would quote
            out.update(t.strip() for t in re.split(r"[\^=\\\x00]", text) + [text] if len(t.strip()) >= 3)
    return sorted(out, key=len, reverse=True)


def scrub(message: str, secrets: list[str]) -> str:
    for s in secrets:
        message = message.replace(s, "[header value]")
    return message


def _transfer_syntax(ds):
    """The dataset's transfer syntax; a bare dataset (no file meta) gets the encoding it was read with."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ts = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if ts is None:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = getattr(ds, "file_meta", None) or __import__("pydicom").dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return UID(str(ts))


def _check_decoder(p: Path, ts) -> None:
    from pydicom.pixels import get_decoder

    named = f"{ts.name} ({ts})" if ts.name != str(ts) else "an unknown transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ImageLoadError(p, f"DICOM pixel data is compressed with {named}, which vlm-xray cannot decode") from None
    if not decoder.is_available:
        raise ImageLoadError(p, f"DICOM pixel data is compressed with {named}; no installed decoder reads it "
                                f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)")


def _stored_bits(arr: np.ndarray, ds) -> np.ndarray:
    """Keep only the BitsStored low bits (sign-extended for signed data): bits above them may hold overlays."""
    bits = int(ds.get("BitsStored") or 0)
    if arr.dtype.kind not in "iu" or not 0 < bits < arr.dtype.itemsize * 8:
        return arr
    if arr.dtype.kind == "u":
        return arr & np.array((1 << bits) - 1, dtype=arr.dtype)
    shift = arr.dtype.itemsize * 8 - bits
    return (arr << shift) >> shift


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """VOI windowing to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - centre) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip((x - centre) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((x - (centre - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _first_number(value) -> float | None:
    try:
        v = float(_values(value)[0])
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) else None


def _grey_display(arr: np.ndarray, ds, opts: LoadOptions, notes: list[str]) -> np.ndarray:
    """Modality LUT, then the VOI (override window, VOI LUT sequence, first window, or the real range)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    x = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if opts.window is not None:
        return _window(x, float(opts.window[0]), float(opts.window[1]), "LINEAR")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        # the LUT is indexed by modality-LUT output values (integers by definition)
        out = np.asarray(apply_voi_lut(np.round(x).astype(np.int64), ds, index=0, prefer_lut=True))
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) if "LUTDescriptor" in ds.VOILUTSequence[0] else 16
        return np.clip(out / float((1 << bits) - 1), 0.0, 1.0)
    centre, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if centre is not None and width is not None:
        if width > 0:
            function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
            return _window(x, centre, width, function if function in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")
        notes.append("the DICOM window width is not positive: the image's full range was used")
    return scale_to_uint8(x).astype(np.float64) / 255.0


def _colour_display(arr: np.ndarray, ds, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = np.asarray(apply_color_lut(arr, ds))
        return scale_to_uint8(arr, 0, 65535 if arr.dtype.itemsize > 1 else 255)
    bits = int(ds.get("BitsStored") or 8)
    return scale_to_uint8(arr, 0, (1 << bits) - 1) if arr.dtype != np.uint8 else arr


def _dicom_pixels(p: Path, ds, opts: LoadOptions, notes: list[str]) -> tuple[np.ndarray, str]:
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageLoadError(p, "DICOM file holds no image (no pixel data: a DICOMDIR, report or other object)")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageLoadError(p, "DICOM image has no Rows/Columns")
    _check_decoder(p, _transfer_syntax(ds))
    frames = int(_first_number(ds.get("NumberOfFrames")) or 1)
    check_size(p, int(ds.Columns), int(ds.Rows), opts)
    if frames > 1:
        notes.append(first_frame_warning(p, "DICOM file", frames, opts))
        ds.pixel_array_options(index=0)  # decode the first frame only
    arr = _stored_bits(np.asarray(ds.pixel_array), ds)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric not in PHOTOMETRICS:
        raise ImageLoadError(p, "DICOM photometric interpretation is not one vlm-xray reads")
    if photometric.startswith("MONOCHROME"):
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        grey = _grey_display(arr, ds, opts, notes)
        inverse = str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"
        if photometric == "MONOCHROME1" or inverse:
            # low values are white; DX files pair MONOCHROME1 with an INVERSE presentation LUT (one inversion)
            grey = 1.0 - grey
        return np.round(grey * 255.0).astype(np.uint8), photometric
    return _colour_display(arr, ds, photometric), photometric


def _defined_term(ds, keywords: tuple[str, ...], terms: set[str], what: str, notes: list[str]) -> str | None:
    for kw in keywords:
        raw = ds.get(kw)
        if raw in (None, ""):
            continue
        value = str(raw).strip().upper()
        if value in terms:
            return value
        notes.append(f"the DICOM {what} is not a defined term and was not used")
        return None
    return None


def view_fields(ds, notes: list[str]) -> tuple[str | None, str | None, str | None]:
    view = _defined_term(ds, ("ViewPosition",), VIEW_POSITIONS, "view position", notes)
    side = _defined_term(ds, ("ImageLaterality", "Laterality"), LATERALITIES, "laterality", notes)
    part = _defined_term(ds, ("BodyPartExamined",), BODY_PARTS, "body part", notes)
    return view, side, part


def fit_warnings(view: str | None, body_part: str | None, modality: str | None) -> list[str]:
    """Input warnings when the view or body part does not fit the label set's modality (OOD signals)."""
    out = []
    expected = BODY_PARTS_BY_MODALITY.get((modality or "").lower())
    if expected and body_part and body_part not in expected:
        out.append(f"body part {body_part} does not fit the label set ({modality})")
    if (modality or "").lower() == "chest radiograph" and view and view not in FRONTAL_VIEWS:
        kind = "a lateral" if view in {"LL", "RL", "LAT", "LATERAL"} else "a non-frontal"
        out.append(f"view {view} is {kind} view; the label set expects frontal (PA/AP) chest radiographs")
    return out


def read_dicom(p: Path, opts: LoadOptions) -> Image:
    """A DICOM file -> Image; error messages never quote a header value unless include_phi."""
    import pydicom

    with _quiet_pydicom():
        try:
            # large elements (pixel data) are read only when used: the size check comes first
            ds = pydicom.dcmread(str(p), force=True, defer_size="16 MB")
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:  # noqa: BLE001 - a parser's message may quote header bytes; only its type is shown
            detail = f"{type(e).__name__}: {e}" if opts.include_phi else type(e).__name__
            raise ImageLoadError(p, f"not a readable DICOM file ({detail})") from None
        notes: list[str] = []
        try:
            pixels, photometric = _dicom_pixels(p, ds, opts, notes)
            view, side, part = view_fields(ds, notes)
        except Exception as e:  # noqa: BLE001 - decoder failures on hostile data, named and scrubbed
            reason = e.reason if isinstance(e, ImageLoadError) else \
                f"DICOM pixel data could not be decoded ({type(e).__name__}: {e})"
            raise ImageLoadError(p, reason if opts.include_phi else scrub(reason, header_values(ds))) from None
    header = {k: str(ds.get(k)) for k in PHI_KEYWORDS if opts.include_phi and ds.get(k) not in (None, "")}
    return Image(pixels=pixels, path=str(p), id=safe_id(p), view=view, original_mode=f"DICOM {photometric}",
                 laterality=side, body_part=part, warnings=notes + fit_warnings(view, part, opts.label_modality),
                 header=header)


# ----------------------------------------------------------------------------- loading

def load_image(path: str | Path, options: LoadOptions | None = None, **overrides) -> Image:
    """Read a raster or DICOM file into an `Image`; any problem is an `ImageLoadError`.

    options: a `LoadOptions`; keyword overrides (window=, max_pixels=, include_phi=, multiframe=,
    min_side=, label_modality=) replace its fields."""
    opts = replace(options or LoadOptions(), **overrides) if overrides else (options or LoadOptions())
    p = Path(path)
    try:
        st = p.stat()
        head = _read_head(p) if stat.S_ISREG(st.st_mode) else b""
    except OSError as e:
        raise ImageLoadError(p, _os_reason(e, p)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(p, "is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(p, "not a regular file (a device, pipe or socket)")
    if st.st_size == 0:
        raise ImageLoadError(p, "file is empty (0 bytes)")
    kind = sniff(head)
    if kind is None and (p.suffix.lower() in {".dcm", ".dicom", ".dic"} or looks_like_bare_dicom(head)):
        kind = "DICOM"
    if kind is None:
        raise ImageLoadError(p, NOT_AN_IMAGE)
    image = _decode(p, kind, opts)
    h, w = image.pixels.shape[:2]
    check_size(p, w, h, replace(opts, max_pixels=None))  # after EXIF rotation / frame selection
    decoded = scale_to_uint8(image.pixels)
    if decoded.min() == decoded.max():
        image.warnings.append("the image is blank (a single pixel value)")
    image.pixels = to_rgb(decoded)
    image.is_grey = decoded.ndim == 2 or decoded.shape[2] == 1 or equal_channels(image.pixels)
    return image


def equal_channels(rgb: np.ndarray) -> bool:
    """Whether R = G = B everywhere; a colour image is told apart on a sparse sample first (no full pass)."""
    for view in (rgb[::16, ::16], rgb):
        if not (np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 1], view[..., 2])):
            return False
    return True


def _decode(p: Path, kind: str, opts: LoadOptions) -> Image:
    """The format's reader; any failure inside it becomes an ImageLoadError that names the file."""
    try:
        if kind == "DICOM":
            return read_dicom(p, opts)
        return _read_raster(p, kind, opts)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found (it vanished while being read)") from None
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None
    except MemoryError:
        raise ImageLoadError(p, "not enough memory to decode this image") from None
    except UnidentifiedImageError:
        raise ImageLoadError(p, f"{NOT_AN_IMAGE}; it starts like {kind} but is not valid {kind} data") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on hostile data; all name the file here
        detail = str(e).replace(str(p), "the file")
        raise ImageLoadError(p, f"{kind} data is corrupt, truncated or unsupported ({type(e).__name__}: {detail})") from None


# ----------------------------------------------------------------------------- discovery

@dataclass
class Discovery:
    """What a scan of the inputs found: images to read, entries not scored (with a reason) and a count
    of plainly-not-image files (.txt, .csv, .json, ...) that are only summarised."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason)
    not_images: int = 0
    folders_not_scanned: int = 0  # sub-folders left out by recursive=False
    duplicates: int = 0  # paths naming a file already found (a link, a repeated input): scored once


class _Scan:
    def __init__(self, recursive: bool, follow_symlinks: bool):
        self.recursive, self.follow_symlinks = recursive, follow_symlinks
        self.found = Discovery()
        self.seen_dirs: set[tuple[int, int]] = set()

    def skip(self, entry: Path | str, reason: str) -> None:
        self.found.skipped.append((str(entry), reason))

    def folder(self, root: Path) -> None:
        """Scan a folder depth first in name order; every entry is an image, skipped with a reason, or counted."""
        try:
            st = root.stat()
            self.seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.skip(root, f"folder could not be read: {_os_reason(e, root)}")
            return
        for entry in entries:
            self.entry(Path(entry.path), entry)

    def entry(self, p: Path, entry: os.DirEntry) -> None:
        try:
            if entry.is_symlink():
                return self.symlink(p)
            if entry.is_dir(follow_symlinks=False):
                return self.subfolder(p)
            if entry.is_file(follow_symlinks=False):
                return self.file(p)
            self.skip(p, "not a regular file (a device, pipe or socket)")
        except OSError as e:
            self.skip(p, _os_reason(e, p))

    def symlink(self, p: Path) -> None:
        try:
            st = os.stat(p)  # follows the link
        except OSError as e:
            return self.skip(p, _os_reason(e, p))
        if stat.S_ISDIR(st.st_mode):
            if not self.follow_symlinks:
                return self.skip(p, "symbolic link to a folder, not followed (use --follow-symlinks)")
            if (st.st_dev, st.st_ino) in self.seen_dirs:
                return self.skip(p, "symbolic link loop (points to a folder already scanned)")
            return self.folder(p) if self.recursive else None
        self.file(p)

    def subfolder(self, p: Path) -> None:
        if p.suffix.lower() in IMAGE_SUFFIXES:
            self.skip(p, "is a folder named like an image" + (" (its contents were scanned)" if self.recursive else ""))
        if self.recursive:
            self.folder(p)
        else:
            self.found.folders_not_scanned += 1

    def file(self, p: Path) -> None:
        suffix, name = p.suffix.lower(), p.name.lower()
        hidden_or_plain = name.startswith(".") or name in NOT_IMAGE_NAMES or suffix in NOT_IMAGE_SUFFIXES
        if suffix in IMAGE_SUFFIXES and not name.startswith("."):
            self.found.images.append(p)  # the loader names whatever is wrong with its content
            return
        try:
            head = _read_head(p)
        except OSError as e:
            return self.skip(p, _os_reason(e, p))
        if sniff(head) or (not hidden_or_plain and looks_like_bare_dicom(head)):
            self.found.images.append(p)
        elif hidden_or_plain:
            self.found.not_images += 1
        elif not head:
            self.skip(p, "file is empty (0 bytes)")
        else:
            self.skip(p, NOT_AN_IMAGE)


    def matched(self, p: Path) -> None:
        """A glob match: a folder is scanned, a file classified by content like a folder entry."""
        try:
            if p.is_symlink():
                return self.symlink(p)
            return self.folder(p) if p.is_dir() else self.file(p)
        except OSError as e:
            self.skip(p, _os_reason(e, p))


def _is_pattern(item: str) -> bool:
    return any(ch in item for ch in "*?[")


def discover(inputs, recursive: bool = True, follow_symlinks: bool = False) -> Discovery:
    """Expand files, folders and glob patterns into images found by content, in input order.

    Folders are scanned in name order (recursively unless recursive=False); symbolic links to files
    are read, links to folders followed only with follow_symlinks (loops detected). A file named
    explicitly is always an image candidate (the loader reports what is wrong with it). Every other
    entry that is not an image is in `skipped` with its reason, unless plainly not an image
    (NOT_IMAGE_SUFFIXES, hidden files), which is only counted. Duplicates (same real path) are dropped."""
    scan = _Scan(recursive, follow_symlinks)
    for item in map(str, inputs):
        p = Path(item)
        if _is_pattern(item) and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                scan.skip(item, "no file matches this pattern")
            for m in matches:
                scan.matched(Path(m))
        elif p.is_dir():
            scan.folder(p)
        else:
            scan.found.images.append(p)  # missing or unreadable: reported by load_image, not dropped here
    scan.found.images = _unique(scan.found.images, scan.found)
    return scan.found


def _unique(paths: list[Path], found: Discovery) -> list[Path]:
    """One path per real file, in first-seen order; where a link and the file itself both appear, the
    file's own path is kept. Duplicates are counted (they are scored, once)."""
    kept: dict[str, Path] = {}
    for p in paths:
        key = os.path.realpath(p)
        if key not in kept:
            kept[key] = p
            continue
        found.duplicates += 1
        if kept[key].is_symlink() and not p.is_symlink():
            kept[key] = p
    return list(kept.values())


def find_images(inputs, recursive: bool = True, follow_symlinks: bool = False) -> list[Path]:
    """The images `discover` finds (entries it skips are left out; use `discover` to report them)."""
    return discover(inputs, recursive, follow_symlinks).images
