"""Is COVID-vs-normal inside COVID-QU learnable from the unseen starter's frozen image features at all?
A logistic regression trained ONLY on same-source pairs (K COVID-QU COVID + K COVID-QU normals from the
training patients), scored on the held-out COVID-QU rows (the pre-training validation patients), against
the zero-shot COVID19 probability on the same rows. Exploratory: tells whether a source-restricted
objective could reach the issue's +0.05, before building one into the adapters.

    python benchmarks/fewshot-v2/within_source_probe.py [--shots 16 64] [--seeds 3]
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from vlm.adapt.baselines import frozen_features
from vlm.adapt.heads import PromptHead
from vlm.adapt.study import pretrain_val_split
from vlm.data import load_labelled_csv
from vlm.labels import load_label_set
from vlm.metrics import roc_auc
from vlm.models import load_model
from vlm.prompt_classifier import text_classifier

logger = logging.getLogger("within-source-probe")


def _covidqu(data, label: str) -> np.ndarray:
    src, cls = np.asarray(data.column("source")), np.asarray(data.column("labels"))
    return np.flatnonzero((src == "covidqu") & (cls == label))


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/chest4/labels.csv")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    backbone = load_model("vlm-xray-starter-unseen", device="cpu")
    ls = load_label_set("chest4")
    pool, held, _ = pretrain_val_split(backbone, load_labelled_csv(args.data, ls))
    held = held.subset(np.r_[_covidqu(held, "COVID19"), _covidqu(held, "NORMAL")])
    hx, hy, _ = frozen_features(backbone, held)
    y_held = hy[:, ls.names.index("COVID19")]
    zs = PromptHead.from_classifier(text_classifier(backbone, ls)).eval()
    with torch.no_grad():
        p_zs = zs(hx).mean(-2)[:, ls.names.index("COVID19")].numpy()
    logger.info(f"held-out COVID-QU: {int(y_held.sum())} COVID vs {int(len(y_held) - y_held.sum())} normals; "
                f"zero-shot AUC {roc_auc(y_held, p_zs):.3f}")
    for k in args.shots:
        aucs = {"probe": [], "probe + zero-shot logit": []}
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            idx = np.r_[rng.choice(_covidqu(pool, "COVID19"), k, replace=False),
                        rng.choice(_covidqu(pool, "NORMAL"), k, replace=False)]
            tx, ty, _ = frozen_features(backbone, pool.subset(idx))
            y = ty[:, ls.names.index("COVID19")]
            with torch.no_grad():
                z_tr = zs(tx).mean(-2)[:, ls.names.index("COVID19")].numpy()
            for name, (a, b) in {"probe": (tx.numpy(), hx.numpy()),
                                 "probe + zero-shot logit": (np.c_[tx.numpy(), _logit(z_tr)],
                                                             np.c_[hx.numpy(), _logit(p_zs)])}.items():
                clf = LogisticRegression(C=1.0, max_iter=2000).fit(a, y)
                aucs[name].append(roc_auc(y_held, clf.predict_proba(b)[:, 1]))
        for name, v in aucs.items():
            logger.info(f"K={k} same-source pairs, {name}: within-COVID-QU AUC {np.mean(v):.3f} ± {np.std(v):.3f} "
                        f"(seeds: {', '.join(f'{x:.3f}' for x in v)})")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


if __name__ == "__main__":
    main()
