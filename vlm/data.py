"""Labelled data: the one CSV reader, group key and patient split every command shares.

A labelled CSV has `filename` (relative to the CSV's folder) and `labels` (pipe-separated)
columns, exactly as in `../shared/data/*/labels.csv`; optional `patient` (grouped splits),
`source` (within-source evaluation), `view`, `split`, `license`, `caption`.
Label strings are matched to a label set (names, aliases, groups, declared normal labels);
unknown names are an error naming the file, row and label, unless the caller asks to skip them.

The patient split is a seeded sha256 hash of the group key `<csv folder name>/<patient or
filename>`: it defines which patients the bundled starter models held out during pre-training,
so its formula must never change (tests/test_data.py pins it).
"""
from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .fileio import read_yaml
from .labels import LabelSet, LabelSetError, list_label_sets, load_label_set

logger = logging.getLogger(__name__)

UNKNOWN_POLICIES = ("error", "skip")


class DataError(ValueError):
    """A labelled-data file is missing, malformed, or uses unknown label names."""


# ----------------------------------------------------------------------------- plain CSV

def read_csv_table(path: str | Path, required: Sequence[str] = ("filename",)) -> list[dict]:
    """Rows of a CSV as dicts (utf-8, a byte-order mark is fine); DataError naming the file when
    it is missing, unreadable, or lacks one of the `required` columns."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: CSV file not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            missing = [c for c in required if c not in cols]
            if missing:
                raise DataError(f"{p}: missing column(s) {', '.join(map(repr, missing))} "
                                f"(columns: {', '.join(cols) or 'no header'})")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{p}: cannot read CSV ({e})") from e


def label_strings(row: dict) -> tuple[str, ...]:
    """The pipe-separated `labels` cell as stripped, non-empty strings."""
    return tuple(s.strip() for s in (row.get("labels") or "").split("|") if s.strip())


# ----------------------------------------------------------------------------- groups and split

def group_key(csv_path: str | Path, row: dict) -> str:
    """`<csv folder name>/<patient or filename>`: the unit a patient split never divides."""
    patient = (row.get("patient") or "").strip()
    return f"{Path(csv_path).parent.name}/{patient or row['filename']}"


def in_validation(group: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether `group` is on the validation side of the seeded split. Never change this formula:
    it decides the bundled starters' held-out patients."""
    return int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction


def patient_split(groups: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) of `groups`, each in input order. A group goes wholly to
    one side, decided by a seeded hash of its key, so adding rows never reshuffles other patients."""
    val = np.array([in_validation(g, val_fraction, seed) for g in groups], dtype=bool)
    return np.where(~val)[0], np.where(val)[0]


# ----------------------------------------------------------------------------- labelled data

@dataclass
class LabelledData:
    csv_path: Path
    label_set: LabelSet
    paths: list[str]
    targets: np.ndarray  # (N, L) 0/1; multiclass rows are one-hot, group rows mark every member
    groups: list[str]  # group_key(): "<csv folder>/<patient or filename>"
    rows: list[dict] = field(default_factory=list)  # the CSV rows as read (all columns)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "LabelledData":
        idx = list(map(int, idx))
        return LabelledData(self.csv_path, self.label_set, [self.paths[i] for i in idx], self.targets[idx],
                            [self.groups[i] for i in idx], [self.rows[i] for i in idx] if self.rows else [])

    def split(self, val_fraction: float, seed: int = 0) -> tuple["LabelledData", "LabelledData"]:
        """(train, validation) by `patient_split` of the groups."""
        tr, va = patient_split(self.groups, val_fraction, seed)
        return self.subset(tr), self.subset(va)

    def column(self, name: str) -> list[str]:
        """One CSV column, stripped ('' where absent)."""
        return [(r.get(name) or "").strip() for r in self.rows] if self.rows else [""] * len(self)

    @property
    def sources(self) -> list[str]:
        return self.column("source")

    @property
    def patients(self) -> list[str]:
        return self.column("patient")

    @property
    def patient_ids(self) -> list[str]:
        """Patient (or filename when absent) without the folder: what must never be shared between
        training and evaluation rows read from *different* CSVs (nih14 and nih14-lowres share patients)."""
        return [(r.get("patient") or "").strip() or r["filename"] for r in self.rows] if self.rows else list(self.groups)

    def label_names(self, i: int) -> tuple[str, ...]:
        """Label names of row `i` (label-set order)."""
        return tuple(n for n, t in zip(self.label_set.names, self.targets[i]) if t)

    @property
    def class_index(self) -> np.ndarray:
        """Multiclass: the index of each row's class (rows of groups take their first member)."""
        return self.targets.argmax(1)


def load_mapping(path: str | Path | None) -> dict[str, str]:
    if not path:
        return {}
    p = Path(path)
    data = read_yaml(p, what="label mapping", error=DataError)
    if not isinstance(data, dict):
        raise DataError(f"{p}: a label mapping must be a YAML mapping 'dataset name: label-set name'")
    return {str(k): str(v) for k, v in data.items()}


def _resolve_labels(p: Path, rows: list[tuple[int, dict]], label_set: LabelSet, mapping: dict[str, str],
                    unknown: str, keep_unknown_with: Sequence[str]) -> tuple[list[tuple[int, dict]], np.ndarray]:
    """Targets of the rows; rows with unknown labels raise, or are skipped (logged with counts)
    when `unknown="skip"` unless one of `keep_unknown_with` columns is filled in (e.g. a caption)."""
    names = label_set.names
    kept, targets = [], []
    unknown_rows: dict[str, list[int]] = {}
    for rownum, r in rows:
        t = np.zeros(len(names), dtype=np.int8)
        bad = False
        for raw in label_strings(r):
            resolved = label_set.resolve_name(mapping.get(raw, raw))
            if resolved is None:
                unknown_rows.setdefault(raw, []).append(rownum)
                bad = True
                continue
            for n in resolved:
                t[names.index(n)] = 1
        if bad and not any((r.get(c) or "").strip() for c in keep_unknown_with):
            if unknown == "skip":
                continue
        kept.append((rownum, r))
        targets.append(t)
    if unknown_rows:
        listing = ", ".join(f"{k!r} ({len(v)} row(s), first row {v[0]})"
                            for k, v in sorted(unknown_rows.items(), key=lambda kv: -len(kv[1])))
        if unknown == "error":
            raise DataError(
                f"{p}: label(s) not in label set {label_set.name!r}: {listing}. Known: {', '.join(names)}"
                f"{'; normal: ' + ', '.join(label_set.normal_labels) if label_set.normal_labels else ''}. "
                f"Pass a mapping file (YAML 'dataset name: label name') to rename them.")
        logger.warning("%s: skipped %d row(s) with labels not in %s: %s", p, len(rows) - len(kept),
                       label_set.name, listing)
    return kept, np.array(targets, dtype=np.int8).reshape(len(kept), len(names))


def load_labelled_csv(
    csv_path: str | Path,
    label_set: LabelSet,
    mapping: dict[str, str] | None = None,
    check_files: bool = True,
    split: str | None = None,
    unknown: str = "error",
    keep_unknown_with: Sequence[str] = (),
    allow_unlabelled: bool = False,
) -> LabelledData:
    """Read a labelled CSV and match its labels to `label_set`.

    `split` keeps only rows whose `split` column equals it (e.g. "test"). `unknown`: "error" (a
    DataError naming file, row and label) or "skip" (such rows are dropped and logged with counts).
    Multiclass sets need a label on every row unless `allow_unlabelled`. Row numbers count the
    header as row 1.
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown={unknown!r}: expected one of {', '.join(UNKNOWN_POLICIES)}")
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"{p}: labelled-data CSV not found")
    table = read_csv_table(p, required=("filename", "labels"))
    rows = [(k + 2, r) for k, r in enumerate(table) if split is None or r.get("split") == split]
    if not rows:
        raise DataError(f"{p}: no rows{f' with split={split!r}' if split else ''}")
    rows, targets = _resolve_labels(p, rows, label_set, mapping or {}, unknown, keep_unknown_with)
    if not rows:
        raise DataError(f"{p}: no rows left after skipping unknown labels")
    if not label_set.multilabel and not allow_unlabelled:
        empty = np.where(targets.sum(1) == 0)[0]
        if len(empty):
            rownum, r = rows[empty[0]]
            raise DataError(f"{p}: {len(empty)} row(s) have no label of multiclass set {label_set.name!r} "
                            f"(first: row {rownum}, {r['filename']!r})")
    paths = [str(p.parent / r["filename"]) for _, r in rows]
    if check_files:
        missing = [q for q in paths if not Path(q).is_file()]
        if missing:
            raise DataError(f"{p}: {len(missing)} listed file(s) not found, e.g. {missing[0]} "
                            f"(filenames are relative to the CSV's folder)")
    plain = [r for _, r in rows]
    return LabelledData(p, label_set, paths, targets, [group_key(p, r) for r in plain], plain)


def detect_label_set(csv_path: str | Path) -> str:
    """The label set whose names/aliases/normal labels cover most of the CSV's label strings
    (ties: the smaller set). DataError when none covers at least 90 %."""
    raws = Counter(s for row in read_csv_table(csv_path, required=("filename", "labels"))
                   for s in label_strings(row))
    if not raws:
        raise DataError(f"{csv_path}: no labels in the 'labels' column; pass PATH:LABELSET")
    best = None
    for name in list_label_sets():
        try:
            ls = load_label_set(name)
        except LabelSetError as e:  # a broken user file should not block detection, but is reported
            logger.warning("label-set detection skipped %s: %s", name, e)
            continue
        covered = sum(n for s, n in raws.items() if ls.resolve_name(s) is not None)
        key = (covered / sum(raws.values()), -len(ls.labels))
        if best is None or key > best[0]:
            best = (key, name)
    if best is None or best[0][0] < 0.9:
        raise DataError(f"{csv_path}: no label set covers its labels ({', '.join(sorted(raws)[:8])}...); "
                        f"pass PATH:LABELSET")
    return best[1]


def sample_shots(data: LabelledData, shots: int | None, seed: int = 0) -> np.ndarray:
    """Indices of k examples per label (seeded). `None` = every row.

    Multilabel: k positives per label (a row may serve several labels) plus k rows with no label.
    """
    if shots is None:
        return np.arange(len(data))
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for j in range(data.targets.shape[1]):
        pos = np.where(data.targets[:, j] == 1)[0]
        if data.label_set.multilabel:
            have = [i for i in chosen if data.targets[i, j] == 1]
            need = max(0, shots - len(have))
            pool = np.setdiff1d(pos, chosen)
        else:
            pos = np.where(data.class_index == j)[0]
            need, pool = shots, pos
        if need and len(pool):
            chosen += rng.choice(pool, size=min(need, len(pool)), replace=False).tolist()
    if data.label_set.multilabel:
        normal = np.setdiff1d(np.where(data.targets.sum(1) == 0)[0], chosen)
        if len(normal):
            chosen += rng.choice(normal, size=min(shots, len(normal)), replace=False).tolist()
    return np.array(sorted(set(chosen)))
