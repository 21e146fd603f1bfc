"""Reading an upload safely: a streamed multipart parser that counts bytes (413 past the limit,
before the rest arrives), identification by content bytes (415 for anything that is not PNG,
JPEG, TIFF, BMP, GIF or DICOM, whatever the Content-Type says), and decoding through
`vlm.images.load_image` from a private temp folder (422 for undecodable, too-small or bomb-sized
images). The temp file lives only while it is decoded.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from .errors import ApiError

logger = logging.getLogger(__name__)

# (offset, magic, kind): what an upload must start with. DICOM: 'DICM' after the 128-byte preamble.
MAGIC = [(0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"\xff\xd8\xff", "JPEG"), (0, b"II*\x00", "TIFF"),
         (0, b"MM\x00*", "TIFF"), (0, b"II+\x00", "TIFF"), (0, b"MM\x00+", "TIFF"), (0, b"BM", "BMP"),
         (0, b"GIF87a", "GIF"), (0, b"GIF89a", "GIF"), (128, b"DICM", "DICOM")]
ACCEPTED = "PNG, JPEG, TIFF, BMP, GIF or DICOM (with the DICM preamble)"
FIELD_LIMIT = 64 * 1024  # bytes per non-file form field
MAX_FIELDS = 32
FORM_OVERHEAD = 256 * 1024  # multipart headers and fields allowed on top of the file limit


def sniff_upload(data: bytes) -> str | None:
    """The kind named by the upload's magic bytes, or None."""
    return next((kind for off, magic, kind in MAGIC if data[off:off + len(magic)] == magic), None)


@dataclass
class UploadForm:
    fields: dict[str, str] = field(default_factory=dict)
    file: bytes | None = None
    filename: str = ""


class _FormCollector:
    """python-multipart callbacks -> UploadForm, with per-part limits."""

    def __init__(self, file_limit: int):
        self.form = UploadForm()
        self.file_limit = file_limit
        self._headers: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._buf = bytearray()
        self._name = ""
        self._is_file = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": self._hfield, "on_header_value": self._hvalue, "on_header_end": self._hend,
                "on_headers_finished": self._headers_done}

    def _begin(self):
        self._headers, self._buf = {}, bytearray()
        self._header_name = self._header_value = b""

    def _hfield(self, data, start, end):
        self._header_name += data[start:end]

    def _hvalue(self, data, start, end):
        self._header_value += data[start:end]

    def _hend(self):
        self._headers[self._header_name.decode("latin-1").lower()] = self._header_value.decode("latin-1")
        self._header_name = self._header_value = b""

    def _headers_done(self):
        _, params = parse_options_header(self._headers.get("content-disposition", ""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self._is_file = filename is not None
        if self._is_file and self._name == "file":
            self.form.filename = Path(filename.decode("utf-8", "replace").replace("\\", "/")).name

    def _data(self, data, start, end):
        self._buf += data[start:end]
        if self._is_file and len(self._buf) > self.file_limit:
            raise ApiError(413, "too_large", f"the uploaded file is larger than the limit of "
                                             f"{self.file_limit / 2**20:.0f} MB")
        if not self._is_file and len(self._buf) > FIELD_LIMIT:
            raise ApiError(413, "too_large", f"form field {self._name!r} is larger than {FIELD_LIMIT} bytes")

    def _end(self):
        if self._name == "file":
            if self.form.file is not None:
                raise ApiError(422, "invalid_request", "send exactly one 'file' part")
            self.form.file = bytes(self._buf)
        elif self._name:
            if len(self.form.fields) >= MAX_FIELDS:
                raise ApiError(422, "invalid_request", f"more than {MAX_FIELDS} form fields")
            self.form.fields[self._name] = self._buf.decode("utf-8", "replace")
        self._buf = bytearray()


async def read_upload_form(request, file_limit: int) -> UploadForm:
    """Stream a multipart/form-data body, counting bytes as they arrive; 413 as soon as the file
    part (or the whole body) passes its limit, without reading the rest."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(415, "unsupported_media_type",
                       "send the image as multipart/form-data with a part named 'file'")
    body_limit = file_limit + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise ApiError(413, "too_large", f"the request body ({int(declared) / 2**20:.1f} MB) is larger than the "
                                         f"limit of {file_limit / 2**20:.0f} MB")
    collector = _FormCollector(file_limit)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise ApiError(413, "too_large", f"the request body is larger than the limit of "
                                                 f"{file_limit / 2**20:.0f} MB")
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types on malformed bodies
        raise ApiError(422, "invalid_request", f"malformed multipart body ({type(e).__name__})") from None
    if collector.form.file is None:
        raise ApiError(422, "invalid_request", "no 'file' part in the form: upload the image as field 'file'")
    return collector.form


class PrivateUploads:
    """A temp folder only this process can read (0700); each upload is one file in it, removed as
    soon as it is decoded; the folder is removed at shutdown."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="vlm-xray-serve-"))
        os.chmod(self.root, 0o700)

    def decode(self, data: bytes, load_options):
        """bytes -> vlm Image; ApiError 415/422 naming the problem (never the temp path)."""
        from ..images import ImageLoadError, load_image

        kind = sniff_upload(data)
        if kind is None:
            raise ApiError(415, "unsupported_media_type",
                           f"the file's content is not a supported image: expected {ACCEPTED}")
        path = self.root / f"{uuid.uuid4().hex}.{kind.lower()}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            image = load_image(path, load_options)
        except ImageLoadError as e:
            raise ApiError(422, "unreadable_image", _without_path(e.reason, path)) from None
        finally:
            path.unlink(missing_ok=True)
        image.path = ""  # the temp name means nothing to the client
        return kind, image

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _without_path(reason: str, path: Path) -> str:
    return reason.replace(str(path), "the upload").replace(path.name, "the upload")
