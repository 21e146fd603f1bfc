"""How strict should the per-label guard be, and does a source-matched training signal help? The
chest4 study of `vlm-xray-starter-unseen` (held-out = its pre-training validation patients) for the
frozen-feature methods (cheap: seconds per run) under settings QUANTILE,N_BOOT,SHOTS of
`vlm.adapt.guard` (QUANTILE "off": guard switched off, to see the adapters themselves; SHOTS "k" =
k per class, "matched" = `source_matched_sample`); one table per setting (benchmarks/fewshot-v2/table.py)
with the worst seed's change of TB and of COVID19 within COVID-QU.

    python benchmarks/fewshot-v2/guard_settings.py [--setting 0.1,200,k --setting off,0,matched ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from vlm.adapt import guard
from vlm.adapt.study import run_study
from vlm.data import load_labelled_csv
from vlm.labels import load_label_set
from vlm.models import load_model

logger = logging.getLogger("guard-settings")
COLS = [("TUBERCULOSIS", "auc:TUBERCULOSIS"), ("COVID19 within COVID-QU", "within:COVID19@covidqu")]


def _table_module():
    spec = importlib.util.spec_from_file_location("fewshot_table", Path(__file__).with_name("table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", action="append", default=[], help="QUANTILE,N_BOOT,SHOTS (repeatable)")
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--data", default="../shared/data/chest4/labels.csv")
    ap.add_argument("--out", default="benchmarks/fewshot-v2/guard-settings")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = [tuple(s.split(",")) for s in args.setting] or [
        ("off", "0", "k"), ("off", "0", "matched"), ("0.1", "200", "k"), ("0.05", "1000", "k")]
    backbone = load_model("vlm-xray-starter-unseen", device="cpu")
    ls = load_label_set("chest4")
    data = load_labelled_csv(args.data, ls)
    table = _table_module()
    for q, n_boot, shots in settings:
        guard.ENABLED = q != "off"
        if guard.ENABLED:
            guard.QUANTILE, guard.N_BOOT = float(q), int(n_boot)
        out = Path(args.out) / f"q{q}-boot{n_boot}-{shots}"
        res = run_study(backbone, ls, data, None, shots=args.shots, seeds=3, methods=["linear-probe", "tip-adapter"],
                        out_dir=out, holdout="pretrain-val", source_matched_shots=shots == "matched",
                        command=" ".join(["python"] + sys.argv))
        what = "guard off" if not guard.ENABLED else f"guard quantile {q}, {n_boot} bootstrap resamples"
        logger.info(f"\n{what}, shots {'source-matched' if shots == 'matched' else 'k per class'}:\n"
                    + table.table({"rows": res["rows"]}, COLS))


if __name__ == "__main__":
    main()
