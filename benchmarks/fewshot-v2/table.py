"""The fewshot.md "v2 starters" table from few-shot study folders (study.json, written by
`vlm-xray fewshot-study`): macro and within-source macro AUC, named per-label columns, the worst
seed's change against zero-shot (the never-below target is about every run, not the mean), how
often the per-label guard served each label by zero-shot, and the worst change of any label
(one-vs-rest or within a source) in any run.

    python benchmarks/fewshot-v2/table.py benchmarks/fewshot-v2/unseen-chest4 \
        --col TUBERCULOSIS=auc:TUBERCULOSIS --col "COVID19 within COVID-QU=within:COVID19@covidqu"
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger("fewshot-table")


def _runs(rows: list[dict], method: str, shots: int) -> list[dict]:
    return [r for r in rows if r["method"] == method and r["shots"] == shots]


def _cell(vals: list[float], zero: float | None, show_worst: bool) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    text = f"{np.mean(vals):.3f}" + (f" ± {np.std(vals):.3f}" if len(vals) > 1 else "")
    if show_worst and zero is not None:
        text += f" (worst {min(vals) - zero:+.3f})"
    return text


def _served_zero_shot(runs: list[dict], label: str) -> str:
    hit = sum(1 for r in runs if r.get("hp_zero_shot_labels") in ("all",) or
              label in str(r.get("hp_zero_shot_labels") or "").split("+"))
    return f"{hit}/{len(runs)}"


def _worst_label_change(runs: list[dict], zs: dict) -> str:
    """The most negative change against zero-shot of any label (one-vs-rest or within a source) in any run."""
    cols = [c for c in zs if c.startswith(("auc:", "within:")) and zs[c] is not None]
    deltas = [(r[c] - zs[c], c) for r in runs for c in cols if r.get(c) is not None]
    if not deltas:
        return "n/a"
    d, c = min(deltas)
    return f"{d:+.3f}" + (f" ({c})" if d < 0 else "")


def table(study: dict, cols: list[tuple[str, str]]) -> str:
    rows = study["rows"]
    zs = next(r for r in rows if r["method"] == "zero-shot")
    keys = list(dict.fromkeys((r["method"], r["shots"]) for r in rows))
    labels = sorted({c.split(":", 1)[1].split("@")[0] for _, c in cols})
    head = ["method", "shots", "macro AUC", "within-source macro"] + [n for n, _ in cols] + \
        [f"{lab} served by zero-shot (runs)" for lab in labels] + ["worst change of any label, any run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, k in keys:
        runs = _runs(rows, method, k)
        cells = [method, str(k), _cell([r["macro_auc"] for r in runs], zs["macro_auc"], False),
                 _cell([r.get("within_macro_auc") for r in runs], zs.get("within_macro_auc"), False)]
        cells += [_cell([r.get(c) for r in runs], zs.get(c), method != "zero-shot") for _, c in cols]
        cells += ["" if method == "zero-shot" else _served_zero_shot(runs, lab) for lab in labels]
        cells.append("" if method == "zero-shot" else _worst_label_change(runs, zs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study_dir", type=Path)
    ap.add_argument("--col", action="append", default=[], help="NAME=results column, e.g. TB=auc:TUBERCULOSIS")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    study = json.loads((args.study_dir / "study.json").read_text())
    cols = [tuple(c.split("=", 1)) for c in args.col]
    logger.info(f"{study['meta']['model']} on {study['meta']['label_set']}: {study['meta']['held_out']}, "
                f"{study['meta']['n_held_out']} images, {study['meta']['seeds']} seeds; "
                f"shots: {study['meta'].get('shots_sampling', 'k per class')}")
    logger.info(table(study, cols))


if __name__ == "__main__":
    main()
