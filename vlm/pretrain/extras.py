"""Training-data additions used by the second pre-training stage (`vlm.pretrain.stage2`):
train-only data, class-balanced sampling, low-resolution augmentation.

- **Train-only data** (`train_only_rows`): CSVs whose rows are only ever trained on (e.g.
  `nih14-lowres/`, 513 NIH images stored at 64 px: resolution is a cue, so they must not enter a
  validation split unmarked). A row is dropped when its (source, patient) also occurs among the
  validation rows, so no held-out patient is trained on through the second folder.
- **Class-balanced sampling** (`sampling_weights`): each epoch draws rows with replacement, a row's
  weight ∝ 1 / sqrt(number of training rows with the same label set and label combination), so
  rare findings are seen more often than the thousands of near-identical "normal"/"nevus" rows.
- **Low-resolution augmentation** (`lowres_augment`): with probability p an image is downsampled
  to `size` px and back, so 64 px images (nih14-lowres) do not make resolution a label cue.
"""
from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from ..labels import LabelSet
from .dataset import Row, load_training_rows

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("uniform", "balanced")


def patient_key(row: Row) -> tuple[str, str]:
    """(source, patient id or filename): the same NIH patient in two folders has one key."""
    return row.source, row.group.split("/", 1)[-1]


def train_only_rows(specs: list[tuple[str, str | None]], label_sets: dict[str, LabelSet], val_rows: list[Row],
                    seed: int = 0) -> tuple[list[Row], list[dict]]:
    """Rows of `specs` (path, label set or None) for training only, minus held-out patients, and
    their data-info entries (marked `train_only`). New label sets are added to `label_sets`."""
    if not specs:
        return [], []
    rows, new_sets, info = load_training_rows(specs, seed)
    for name, ls in new_sets.items():
        label_sets.setdefault(name, ls)
    held_out = {patient_key(r) for r in val_rows}
    kept = [r for r in rows if patient_key(r) not in held_out]
    by_csv = Counter(r.group.split("/", 1)[0] for r in rows)
    kept_by_csv = Counter(r.group.split("/", 1)[0] for r in kept)
    for d in info:
        d.update(train_only=True, rows=kept_by_csv[d["dataset"]],
                 dropped_validation_patients=by_csv[d["dataset"]] - kept_by_csv[d["dataset"]])
        logger.info("train-only %s: %d rows, %d dropped (patient in validation)", d["csv"], d["rows"],
                    d["dropped_validation_patients"])
    return kept, info


def sampling_weights(rows: list[Row], mode: str) -> torch.Tensor | None:
    """Per-row sampling weights (None = a uniform permutation each epoch)."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {mode!r}")
    if mode == "uniform":
        return None
    key = [(r.label_set, r.labels, r.caption) for r in rows]
    counts = Counter(key)
    return torch.tensor([counts[k] ** -0.5 for k in key], dtype=torch.double)


def epoch_order(n: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    if weights is None:
        return torch.randperm(n, generator=gen)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def lowres_augment(x: torch.Tensor, prob: float, size: int, gen: torch.Generator) -> torch.Tensor:
    """x: float (B,3,H,W). A random `prob` share of the batch goes down to `size` px and back up."""
    if prob <= 0 or size >= x.shape[-1]:
        return x
    pick = (torch.rand(x.shape[0], generator=gen) < prob).to(x.device)
    if not pick.any():
        return x
    small = F.interpolate(x[pick], size=(size, size), mode="area")
    x = x.clone()
    x[pick] = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x
