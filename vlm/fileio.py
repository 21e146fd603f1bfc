"""Files written whole or not at all, and YAML/JSON read with errors that name the file.

Writers go through a temporary file (or folder) beside the target and rename it into place, so a
reader - another process, a resumed run, a user opening the file - never sees half a file, and an
error or interrupt leaves the previous version (or nothing) and no temporary file behind.

    atomic_write_text / atomic_write_bytes / atomic_write_json   whole files
    atomic_path(path)   a temp path for writers that want a path (np.savez, safetensors, torch.save, PIL)
    atomic_dir(path)    a temp folder that replaces `path` as a whole (adapter folders)
    read_yaml / read_json   data, or FileFormatError "<file>: <what> not found / not valid YAML: ..."

No torch, no numpy: importable from anywhere in `vlm/`.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class FileFormatError(ValueError):
    """A file is missing, unreadable or not valid YAML/JSON; the message names the file and the problem."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TEMP_NUMBERS = itertools.count()


def _create_temp(path: Path) -> tuple[int, Path]:
    """(fd open for writing, name) of a new hidden file beside `path` that keeps its suffix (np.savez
    appends .npz otherwise). Made with the permissions open() would give (0o666 less the umask), in
    one system call: a batch writes two of these a report, and mkstemp + chmod took 60 % longer."""
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}-{next(_TEMP_NUMBERS)}.tmp{path.suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # left by a killed process whose pid came round again
            continue


@contextmanager
def _atomic_fd(path: str | Path) -> Iterator[tuple[int, Path]]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s folder; on success it is renamed onto `path`, on error removed.

    For writers that take a file name (np.savez, safetensors.save_file, torch.save, PIL .save). The
    temporary name ends with the target's suffix, so suffix-adding writers write exactly there."""
    with _atomic_fd(path) as (fd, tmp):
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) replace the file, with 0600


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` via a temp file in the same folder + rename: readers never see half a file."""
    with _atomic_fd(path) as (fd, _), open(fd, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` via a temp file in the same folder + rename: readers never see half a file."""
    with _atomic_fd(path) as (fd, _), open(fd, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, default=None) -> None:
    """`obj` as JSON (plus a final newline), written atomically. Serialising happens first, so an
    object that is not JSON-serialisable leaves the old file untouched."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=default) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` as a whole.

    The old folder (if any) is first renamed aside, the new one renamed into place, then the old one
    deleted: `path` never holds a mix of old and new files or a half-written file. (POSIX has no
    atomic swap of two folders, so for an instant between the two renames `path` does not exist.)
    On error the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            try:
                os.replace(path, old)  # rename onto the empty placeholder folder
            except BaseException:
                old.rmdir()
                raise
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)  # put the previous version back
            raise
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(path: str | Path, what: str, error: type[Exception], kind: str, parse, parse_errors) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise error(f"{path}: {what} not found") from e
    except IsADirectoryError as e:
        raise error(f"{path}: {what} is a folder, expected a file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: {what} unreadable ({e})") from e
    try:
        return parse(text)
    except parse_errors as e:
        raise error(f"{path}: not valid {kind}: {e}") from e


def read_yaml(path: str | Path, what: str = "YAML file", error: type[Exception] = FileFormatError) -> Any:
    """Parsed YAML (safe_load) of `path`. Missing, unreadable or invalid: `error` (FileFormatError, or
    the caller's own ValueError subclass such as LabelSetError) with a message naming the file."""
    import yaml

    # libyaml's safe loader where PyYAML was built with it: the same documents, ~10x faster (label sets
    # are read at every start-up)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return _read(path, what, error, "YAML", lambda text: yaml.load(text, Loader=loader), yaml.YAMLError)


def read_json(path: str | Path, what: str = "JSON file", error: type[Exception] = FileFormatError) -> Any:
    """Parsed JSON of `path`; errors as in `read_yaml`."""
    return _read(path, what, error, "JSON", json.loads, json.JSONDecodeError)
