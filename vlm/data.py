"""Labelled data: the CSV format every command that learns or evaluates reads.

`filename` (relative to the CSV's folder) and `labels` (pipe-separated) columns, exactly as in
`../shared/data/*/labels.csv`; optional `patient` (for grouped splits), `source`, `view`.
Label strings are matched to a label set (names, aliases, groups, declared normal labels);
unknown names are an error that lists them, unless a mapping file renames them.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .labels import LabelSet


class DataError(ValueError):
    """A labelled-data file is missing, malformed, or uses unknown label names."""


@dataclass
class LabelledData:
    csv_path: Path
    label_set: LabelSet
    paths: list[str]
    targets: np.ndarray  # (N, L) 0/1; multiclass rows are one-hot, group rows mark every member
    groups: list[str]  # patient id (or filename when absent), for grouped splits
    rows: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> "LabelledData":
        idx = list(map(int, idx))
        return LabelledData(self.csv_path, self.label_set, [self.paths[i] for i in idx], self.targets[idx],
                            [self.groups[i] for i in idx], [self.rows[i] for i in idx] if self.rows else [])

    @property
    def class_index(self) -> np.ndarray:
        """Multiclass: the index of each row's class (rows of groups take their first member)."""
        return self.targets.argmax(1)


def load_mapping(path: str | Path | None) -> dict[str, str]:
    if not path:
        return {}
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{p}: cannot read label mapping ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{p}: a label mapping must be a YAML mapping 'dataset name: label-set name'")
    return {str(k): str(v) for k, v in data.items()}


def load_labelled_csv(
    csv_path: str | Path,
    label_set: LabelSet,
    mapping: dict[str, str] | None = None,
    check_files: bool = True,
    split: str | None = None,
) -> LabelledData:
    """Read a labelled CSV and match its labels to `label_set`.

    `split` keeps only rows whose `split` column equals it (e.g. "test").
    """
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"{p}: labelled-data CSV not found")
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for col in ("filename", "labels"):
            if col not in cols:
                raise DataError(f"{p}: missing column {col!r} (columns: {', '.join(cols)}); "
                                f"expected filename,labels[,patient,...]")
        rows = [r for r in reader if split is None or r.get("split") == split]
    if not rows:
        raise DataError(f"{p}: no rows{f' with split={split!r}' if split else ''}")
    mapping = mapping or {}
    names = label_set.names
    targets = np.zeros((len(rows), len(names)), dtype=np.int8)
    unknown: dict[str, int] = {}
    for i, r in enumerate(rows):
        for raw in filter(None, (s.strip() for s in (r["labels"] or "").split("|"))):
            resolved = label_set.resolve_name(mapping.get(raw, raw))
            if resolved is None:
                unknown[raw] = unknown.get(raw, 0) + 1
                continue
            for n in resolved:
                targets[i, names.index(n)] = 1
    if unknown:
        listing = ", ".join(f"{k!r} ({v} rows)" for k, v in sorted(unknown.items(), key=lambda kv: -kv[1]))
        raise DataError(
            f"{p}: label(s) not in label set {label_set.name!r}: {listing}. Known: {', '.join(names)}"
            f"{'; normal: ' + ', '.join(label_set.normal_labels) if label_set.normal_labels else ''}. "
            f"Pass a mapping file (YAML 'dataset name: label name') to rename them.")
    if not label_set.multilabel:
        empty = np.where(targets.sum(1) == 0)[0]
        if len(empty):
            raise DataError(f"{p}: {len(empty)} row(s) have no label of multiclass set {label_set.name!r} "
                            f"(first: row {empty[0] + 2}, {rows[empty[0]]['filename']!r})")
    base = p.parent
    paths = [str(base / r["filename"]) for r in rows]
    if check_files:
        missing = [q for q in paths if not Path(q).is_file()]
        if missing:
            raise DataError(f"{p}: {len(missing)} listed file(s) not found, e.g. {missing[0]} "
                            f"(filenames are relative to the CSV's folder)")
    groups = [(r.get("patient") or "").strip() or r["filename"] for r in rows]
    return LabelledData(p, label_set, paths, targets, groups, rows)


def group_split(data: LabelledData, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices split by group (patient), deterministic for a seed.

    A group goes wholly to one side, so no patient's images are on both; the assignment
    hashes the group id with the seed, so adding rows does not reshuffle existing patients.
    """
    def bucket(g: str) -> float:
        return int(hashlib.sha1(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    val = np.array([bucket(g) < val_fraction for g in data.groups])
    return np.where(~val)[0], np.where(val)[0]


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
