"""The model card (README.md) of a pre-trained model, rendered from templates/model_card.md.j2."""
from __future__ import annotations

from pathlib import Path

from ..html import render
from ..labels import LabelSet
from .config import TEXT_WIDTH, PretrainConfig

# our own wording, marked safe in the template (never user-supplied text)
LOSS_TEXT = {
    "multipos": "label-aware multi-positive contrastive: rows with the same label combination are all positives, "
                "so repeated captions are not false negatives",
    "siglip": "pairwise sigmoid (SigLIP) with same-label-combination pairs as positives",
}


def _counts(d: dict) -> str:
    return ", ".join(f"{k or 'n/a'} {v}" for k, v in d.items())


def display_command(command: str | None, config: PretrainConfig) -> tuple[str, bool]:
    """The command line with data folders shown as DATA/<dataset> and the output as the model's
    name, so no machine's absolute paths end up in the card. Returns (text, whether shortened)."""
    if not command:
        return "(Python API)", False
    shown = command
    for path, _ in config.data:
        p = Path(path)
        name = p.parent.name if p.suffix.lower() == ".csv" else p.name
        shown = shown.replace(str(path), f"DATA/{name}" + ("/" + p.name if p.suffix.lower() == ".csv" else ""))
    if config.out_dir:
        shown = shown.replace(str(config.out_dir), Path(config.out_dir).resolve().name)
    return shown, shown != command


def model_card(m: dict, label_sets: dict[str, LabelSet], config: PretrainConfig) -> str:
    c = m["config"]
    text_projection = ("trained" if c["train_text_proj"] else
                       "frozen identity" if c["embed_dim"] == TEXT_WIDTH else "frozen random orthogonal")
    data = [{**d, "sources_text": _counts(d["sources"]),
             "licenses_text": "; ".join(f"{k or 'n/a'} ({v})" for k, v in d["licenses"].items())} for d in m["data"]]
    train_counts = [(s, ", ".join(f"{k} {v}" for k, v in sorted(cnt.items(), key=lambda kv: -kv[1])))
                    for s, cnt in m["train_counts"].items()]

    def ci_text(v: dict, key: str) -> str:
        ci = (v.get("auc_ci") or {}).get(key)
        return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "n/a"

    command, shortened = display_command(m.get("command"), config)
    return render("model_card.md.j2", name=m["name"], m={**m, "data": data}, c=c, text_projection=text_projection,
                  loss_text=LOSS_TEXT[c["loss"]], train_counts=train_counts, ci_text=ci_text,
                  n_boot=m.get("card_bootstrap", 0), command=command, command_shortened=shortened)
