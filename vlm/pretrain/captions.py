"""Captions and prompt texts: what the text tower reads during pre-training.

Each training row's label combination becomes a few caption phrasings built from the label set's
prompt texts (all styles in turn); a `caption`/`report` column is used as is. The prompt bank
indexes every positive/negative prompt per set, style and label for the prompt loss and the
zero-shot evaluation.
"""
from __future__ import annotations

import random

import torch

from ..labels import LabelSet
from .dataset import WITHHELD_MARK, Row

N_CAPTION_VARIANTS = 8


def _join(parts: list[str]) -> str:
    parts = [p.strip() for p in parts]
    if all(p.endswith(".") for p in parts):
        return " ".join(parts)
    return ", ".join(p.rstrip(".") for p in parts)


def make_captions(label_set: LabelSet, labels: tuple[str, ...], rng: random.Random,
                  n: int = N_CAPTION_VARIANTS, withheld: frozenset = frozenset()) -> list[str]:
    """`n` caption phrasings of one label combination (all prompt styles used in turn)."""
    styles = list(label_set.prompt_styles)
    out = []
    for v in range(n):
        style = styles[v % len(styles)]
        if labels and not label_set.multilabel and len(labels) > 1:
            # a group label in a single-label set ("benign keratosis" -> SK or solar lentigo): one member
            parts = [rng.choice(label_set.label(rng.choice(labels)).prompts[style].positive)]
        elif labels:
            parts = [rng.choice(label_set.label(name).prompts[style].positive) for name in labels]
            rng.shuffle(parts)
        else:
            # "normal" in a multi-label set: the negatives of a few findings
            cands = [lab for lab in label_set.labels if lab.name not in withheld]
            parts = [rng.choice(lab.prompts[style].negative) for lab in rng.sample(cands, min(3, len(cands)))]
        out.append(_join(parts))
    return list(dict.fromkeys(out))


class TextTable:
    """Distinct texts in first-seen order, each with its index (what the text tower encodes)."""

    def __init__(self):
        self.texts: list[str] = []
        self._index: dict[str, int] = {}

    def add(self, text: str) -> int:
        if text not in self._index:
            self._index[text] = len(self.texts)
            self.texts.append(text)
        return self._index[text]

    def __len__(self) -> int:
        return len(self.texts)


class Captions:
    """Caption texts of the training rows, grouped by label combination ("combo").

    Rows with the same combination share captions and are each other's positives in the loss.
    Captions are drawn with `random.Random(seed)` in the order rows are first seen."""

    def __init__(self, label_sets: dict[str, LabelSet], withheld: frozenset, seed: int):
        self.label_sets, self.withheld = label_sets, withheld
        self.rng = random.Random(seed)
        self.table = TextTable()
        self.combos: dict[tuple, int] = {}
        self.combo_caps: list[list[int]] = []  # per combo: indices into table.texts

    def combo_of(self, r: Row) -> int:
        key = ("caption", r.caption) if r.caption else (r.label_set, r.labels, r.raw_labels == WITHHELD_MARK)
        if key not in self.combos:
            self.combos[key] = len(self.combos)
            self.combo_caps.append([self.table.add(c) for c in self._captions(r)])
        return self.combos[key]

    def _captions(self, r: Row) -> list[str]:
        if r.caption:
            return [r.caption]
        ls = self.label_sets[r.label_set]
        if not r.labels and r.raw_labels == WITHHELD_MARK:
            return [f"a {ls.modality or 'medical image'}"]
        return make_captions(ls, r.labels, self.rng, withheld=self.withheld)

    def sample(self, combo_batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One caption index per row of the batch, drawn with `gen`."""
        caps = self.combo_caps
        return torch.tensor([caps[c][int(torch.randint(len(caps[c]), (1,), generator=gen))]
                             for c in combo_batch.tolist()])


def prompt_bank(label_sets: dict[str, LabelSet]) -> tuple[list[str], dict]:
    """All prompt texts, and per set/style/label the indices of positive and negative prompts."""
    table = TextTable()
    bank = {}
    for sname, ls in label_sets.items():
        bank[sname] = {style: {lab.name: ([table.add(t) for t in lab.prompts[style].positive],
                                          [table.add(t) for t in lab.prompts[style].negative])
                               for lab in ls.labels}
                       for style in ls.prompt_styles}
    return table.texts, bank
