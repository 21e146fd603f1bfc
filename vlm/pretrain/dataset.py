"""Training rows: labelled CSVs (through `vlm.data`) as rows with label names and captions, the
patient split, withheld labels, and the images preloaded at training resolution."""
from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..data import DataError, detect_label_set, label_strings, load_labelled_csv, patient_split
from ..labels import LabelSet, load_label_set

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("caption", "report", "text")
WITHHELD_MARK = ("<withheld>",)


@dataclass(frozen=True)
class Row:
    path: str
    labels: tuple[str, ...]  # label names of `label_set`, sorted ([] = normal / no finding)
    label_set: str
    group: str  # vlm.data.group_key: "<csv folder>/<patient or filename>" -> split unit
    source: str = ""
    license: str = ""
    caption: str | None = None
    raw_labels: tuple[str, ...] = ()


def _caption(row: dict) -> str | None:
    return next((row[c].strip() for c in CAPTION_COLUMNS if (row.get(c) or "").strip()), None)


def read_rows(csv_path: str | Path, label_set: LabelSet, strict: bool = False) -> list[Row]:
    """Rows of a labels.csv; images resolved beside it. Rows with labels outside `label_set` are an
    error when `strict`, else skipped (logged with counts) unless they carry a caption."""
    data = load_labelled_csv(csv_path, label_set, unknown="error" if strict else "skip",
                             keep_unknown_with=CAPTION_COLUMNS, allow_unlabelled=True)
    names = label_set.names
    return [Row(path=str(Path(p).resolve()), labels=tuple(sorted({n for n, on in zip(names, t) if on})),
                label_set=label_set.name, group=g, source=(r.get("source") or "").strip(),
                license=(r.get("license") or "").strip(), caption=_caption(r), raw_labels=label_strings(r))
            for p, t, g, r in zip(data.paths, data.targets, data.groups, data.rows)]


def split_rows(rows: list[Row], val_fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, validation) by `vlm.data.patient_split` of the rows' groups."""
    tr, va = patient_split([r.group for r in rows], val_fraction, seed)
    return [rows[i] for i in tr], [rows[i] for i in va]


def _csv_of(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "labels.csv"
    if not p.is_file():
        raise DataError(f"training data {path}: no labels.csv found")
    return p


def load_training_rows(specs, seed: int, max_rows_per_csv: int | None = None
                       ) -> tuple[list[Row], dict[str, LabelSet], list[dict]]:
    """(rows of every CSV, label sets by name, per-CSV info for metrics and the model card)."""
    label_sets: dict[str, LabelSet] = {}
    rows_all: list[Row] = []
    info = []
    for path, set_name in specs:
        p = _csv_of(path)
        set_name = set_name or detect_label_set(p)
        ls = label_sets.setdefault(set_name, load_label_set(set_name))
        rows = read_rows(p, ls)
        if max_rows_per_csv and len(rows) > max_rows_per_csv:
            rows = random.Random(seed).sample(rows, max_rows_per_csv)
        rows_all += rows
        # named by dataset and path relative to the data root, never by this machine's absolute path
        info.append({"dataset": p.parent.name, "csv": f"{p.parent.name}/{p.name}", "label_set": ls.name,
                     "rows": len(rows), "licenses": dict(Counter(r.license for r in rows)),
                     "sources": dict(Counter(r.source for r in rows))})
    return rows_all, label_sets, info


def check_withheld(withheld: frozenset, label_sets: dict[str, LabelSet]) -> None:
    all_names = {n for ls in label_sets.values() for n in ls.names}
    bad = sorted(withheld - all_names)
    if bad:
        raise ValueError(f"--withhold {', '.join(bad)}: not a label of {', '.join(label_sets)}")


def withhold(train_rows: list[Row], withheld: frozenset, mode: str) -> tuple[list[Row], int]:
    """Training rows without the withheld labels: rows carrying one are dropped (`drop`) or keep
    only their other labels and a generic caption (`generic`). Returns (rows, number dropped)."""
    if not withheld:
        return train_rows, 0
    kept, dropped = [], 0
    for r in train_rows:
        if not set(r.labels) & withheld:
            kept.append(r)
        elif mode == "generic":
            kept.append(replace(r, labels=tuple(n for n in r.labels if n not in withheld), caption=None,
                                raw_labels=WITHHELD_MARK))
        else:
            dropped += 1
    return kept, dropped


def preload_images(paths: list[str], size: int, cache_dir: str | Path | None = None,
                   progress: bool = True) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, size, size), resized and centre-cropped exactly as at
    inference (`vlm.transforms.resize_center_crop`); optionally cached as .npy."""
    from ..fileio import atomic_path
    from ..images import load_image
    from ..transforms import resize_center_crop

    cache = None
    if cache_dir:
        key = hashlib.sha256(("\n".join(paths) + f"|{size}").encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"images_{size}_{key}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    it = range(len(paths))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"loading images @{size}px", unit="img", leave=False)
    for i in it:
        out[i] = resize_center_crop(load_image(paths[i]).pixels, size).transpose(2, 0, 1)
    if cache is not None:
        with atomic_path(cache) as tmp:
            np.save(tmp, out)
    return torch.from_numpy(out)
