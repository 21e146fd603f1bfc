"""Reading radiographs and photos into one `Image` type.

Every reader returns 8-bit RGB pixels (H, W, 3) so that preprocessing variants and model
transforms see one format. 16-bit greyscale is windowed to its own min/max (PNG/TIFF have no
window metadata); DICOM uses its VOI LUT / window when present and MONOCHROME1 is inverted.
Nothing from a DICOM header except the view position is kept: patient identifiers never
reach results or reports.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".webp"}


class ImageLoadError(Exception):
    """An input could not be read; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Image:
    pixels: np.ndarray  # uint8, (H, W, 3), RGB
    path: str
    id: str  # filesystem-safe, collision-free name derived from the path
    view: str | None = None
    original_mode: str = ""  # e.g. "L", "I;16", "RGBA", "DICOM MONOCHROME2"

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])


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


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = np.percentile(arr, 0.5), np.percentile(arr, 99.5)
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255.0 + 0.5).astype(np.uint8)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] >= 3:
        return np.ascontiguousarray(arr[:, :, :3])
    raise ValueError(f"unsupported pixel array shape {arr.shape}")


def _read_dicom(path: Path) -> tuple[np.ndarray, str | None, str]:
    try:
        import pydicom
        from pydicom.pixels import apply_voi_lut
    except ImportError as e:  # pragma: no cover - pydicom is a declared dependency
        raise ImageLoadError(path, f"reading DICOM needs pydicom ({e}); pip install pydicom") from e
    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as e:
        raise ImageLoadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    try:
        arr = apply_voi_lut(arr, ds)
    except Exception:  # noqa: BLE001 - a missing/odd VOI LUT just means: use the raw range
        pass
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and photometric.startswith("MONOCHROME"):
        arr = arr[0]  # multi-frame: first frame
    arr = _to_uint8(arr)
    if photometric == "MONOCHROME1":
        arr = 255 - arr
    view = getattr(ds, "ViewPosition", None) or None
    return arr, (str(view) if view else None), f"DICOM {photometric}"


def load_image(path: str | Path) -> Image:
    """Read PNG/JPEG/BMP/TIFF (8- or 16-bit, grey, RGB, RGBA) or DICOM into an `Image`."""
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(p, "file not found")
    if p.is_dir():
        raise ImageLoadError(p, "is a folder, not an image")
    if p.stat().st_size == 0:
        raise ImageLoadError(p, "file is empty (0 bytes)")
    view = None
    with open(p, "rb") as f:
        head = f.read(132)
    if p.suffix.lower() in {".dcm", ".dicom"} or head[128:132] == b"DICM":
        arr, view, mode = _read_dicom(p)
    else:
        try:
            with PILImage.open(p) as im:
                im.load()
                mode = im.mode
                if mode in ("RGBA", "LA", "P", "PA"):
                    # composite transparency on black (radiograph background) rather than dropping alpha blindly
                    rgba = im.convert("RGBA")
                    bg = PILImage.new("RGBA", rgba.size, (0, 0, 0, 255))
                    arr = np.asarray(PILImage.alpha_composite(bg, rgba).convert("RGB"))
                elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    arr = _to_uint8(np.asarray(im))
                elif mode in ("L", "RGB"):
                    arr = np.asarray(im)
                else:
                    arr = np.asarray(im.convert("RGB"))
        except UnidentifiedImageError as e:
            raise ImageLoadError(p, "not a recognised image format (expected PNG, JPEG, TIFF, BMP or DICOM)") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageLoadError(p, f"image data is corrupt or truncated ({e})") from e
    arr = _to_rgb(_to_uint8(arr))
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise ImageLoadError(p, f"image is too small ({arr.shape[1]}x{arr.shape[0]} px)")
    return Image(pixels=arr, path=str(p), id=safe_id(p), view=view, original_mode=mode)


def find_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into a sorted, de-duplicated list."""
    import glob

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file()))
        else:
            out.append(p)  # missing files are reported by load_image, not dropped here
    seen: set[str] = set()
    unique = []
    for p in out:
        key = str(p.resolve()) if p.exists() else str(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
