"""The one labelled-CSV reader, group key and patient split (vlm.data)."""
from __future__ import annotations

import csv
import hashlib
import logging

import numpy as np
import pytest

from conftest import needs_shared_data
from vlm.data import (
    DataError,
    group_key,
    load_labelled_csv,
    patient_split,
    read_csv_table,
)
from vlm.labels import load_label_set


def _write_csv(path, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _old_pretrain_split(groups, val_fraction, seed):
    """vlm.pretrain.split_rows as it was before the data module (the formula the starters used)."""
    return [g for g in groups
            if int(hashlib.sha256(f"{seed}:{g}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < val_fraction]


def test_read_csv_table_bom_and_missing_column(tmp_path):
    p = _write_csv(tmp_path / "a.csv", [{"filename": "x.png", "labels": "Mass"}], bom=True)
    assert read_csv_table(p) == [{"filename": "x.png", "labels": "Mass"}]
    q = _write_csv(tmp_path / "b.csv", [{"path": "x.png"}])
    with pytest.raises(DataError, match=r"b\.csv.*'filename'"):
        read_csv_table(q)
    with pytest.raises(DataError, match="not found"):
        read_csv_table(tmp_path / "nowhere.csv")


def test_unknown_label_names_file_row_and_label(tmp_path):
    rows = [{"filename": "a.png", "labels": "Mass"}, {"filename": "b.png", "labels": "Mass|Dragon scales"},
            {"filename": "c.png", "labels": "No Finding"}]
    p = _write_csv(tmp_path / "d" / "labels.csv", rows)
    ls = load_label_set("chestxray14")
    with pytest.raises(DataError, match=r"labels\.csv.*'Dragon scales' \(1 row\(s\), first row 3\)"):
        load_labelled_csv(p, ls, check_files=False)


def test_unknown_labels_skipped_only_when_asked(tmp_path, caplog):
    rows = [{"filename": "a.png", "labels": "Mass", "caption": ""},
            {"filename": "b.png", "labels": "Dragon scales", "caption": ""},
            {"filename": "c.png", "labels": "Dragon scales", "caption": "scaly chest"}]
    p = _write_csv(tmp_path / "d" / "labels.csv", rows)
    ls = load_label_set("chestxray14")
    with caplog.at_level(logging.WARNING, logger="vlm.data"):
        data = load_labelled_csv(p, ls, check_files=False, unknown="skip")
    assert [r["filename"] for r in data.rows] == ["a.png"]
    assert "skipped 2 row(s)" in caplog.text and "Dragon scales" in caplog.text
    kept = load_labelled_csv(p, ls, check_files=False, unknown="skip", keep_unknown_with=("caption",))
    assert [r["filename"] for r in kept.rows] == ["a.png", "c.png"]
    assert kept.label_names(1) == ()


def test_rows_keep_source_patient_and_group_key(tmp_path):
    rows = [{"filename": "a.png", "labels": "Mass", "patient": " 7 ", "source": "nih"},
            {"filename": "b.png", "labels": "No Finding", "patient": "", "source": "other"}]
    p = _write_csv(tmp_path / "site1" / "labels.csv", rows)
    data = load_labelled_csv(p, load_label_set("chestxray14"), check_files=False)
    assert data.groups == ["site1/7", "site1/b.png"]
    assert data.sources == ["nih", "other"] and data.patients == ["7", ""]
    assert group_key(p, rows[1]) == "site1/b.png"
    assert data.label_names(0) == ("Mass",)


def test_patient_split_equals_the_pretraining_formula(tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"filename": f"img{i}.png", "labels": "Mass", "patient": str(rng.integers(0, 150)) if i % 4 else ""}
            for i in range(400)]
    p = _write_csv(tmp_path / "gen" / "labels.csv", rows)
    data = load_labelled_csv(p, load_label_set("chestxray14"), check_files=False)
    for seed, frac in ((0, 0.15), (1, 0.5)):
        tr, va = patient_split(data.groups, frac, seed)
        assert sorted(set(data.groups[i] for i in va)) == sorted(set(_old_pretrain_split(data.groups, frac, seed)))
        assert not ({data.groups[i] for i in tr} & {data.groups[i] for i in va})
        assert list(tr) == sorted(tr) and len(tr) + len(va) == len(data)
        train, val = data.split(frac, seed)
        assert val.paths == [data.paths[i] for i in va]


# Recorded from the code that trained the bundled starters (vlm.pretrain.read_rows + split_rows at
# commit 408974e, seed 0, val_fraction 0.15): sha256 of the sorted validation group keys, joined by "\n".
STARTER_VAL_GROUPS = {
    "nih14": ("chestxray14", 176, "093ab6282b0d5b1189fcb5cb8f5fd5f853d246d6b808d64abd9824088912e51a"),
    "skin": ("skin12", 300, "dd28434d340651e4d61d1f28dc94579e0d0ae11400462a8b0fac7ef8091cc64b"),
}


@pytest.mark.parametrize("dataset", sorted(STARTER_VAL_GROUPS))
def test_starter_validation_patients_unchanged(dataset):
    folder = needs_shared_data(dataset)
    set_name, n_val, digest = STARTER_VAL_GROUPS[dataset]
    data = load_labelled_csv(folder / "labels.csv", load_label_set(set_name), check_files=False,
                             unknown="skip", allow_unlabelled=True)
    _, val = data.split(0.15, seed=0)
    assert len(val) == n_val
    assert hashlib.sha256("\n".join(sorted(set(val.groups))).encode()).hexdigest() == digest


def test_exclusion_across_datasets_matches_bare_patient_ids(tmp_path):
    from vlm.adapt.core import exclude_groups

    ls = load_label_set("chestxray14")
    a = _write_csv(tmp_path / "nih14" / "labels.csv", [{"filename": "a.png", "labels": "Mass", "patient": "1"},
                                                        {"filename": "b.png", "labels": "Mass", "patient": "2"}])
    b = _write_csv(tmp_path / "nih14-lowres" / "labels.csv", [{"filename": "c.png", "labels": "", "patient": "1"},
                                                               {"filename": "d.png", "labels": "", "patient": "3"}])
    train = load_labelled_csv(a, ls, check_files=False)
    held = load_labelled_csv(b, ls, check_files=False)
    assert train.groups == ["nih14/1", "nih14/2"] and held.groups == ["nih14-lowres/1", "nih14-lowres/3"]
    assert [r["filename"] for r in exclude_groups(held, train).rows] == ["d.png"]
