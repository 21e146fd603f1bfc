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
                  n_boot=m.get("card_bootstrap", 0), command=command, command_shortened=shortened, init=_init_info(m))


def _init_info(m: dict) -> dict:
    """The model a stage-1 run started from (`--init-from`), as its metrics record it (empty: random init)."""
    cmd = m.get("init_from_command")
    return {"name": m.get("init_from_name"), "size": m.get("init_from_image_size"),
            "command": _portable(cmd) if cmd else ""}


def _portable(cmd: str | None) -> str:
    """A command line without this machine's paths: data as ../shared/data/..., outputs by folder name."""
    import re

    if not cmd:
        return "(Python API)"
    cmd = re.sub(r"\S*/shared/data/", "../shared/data/", cmd)
    cmd = re.sub(r"--base \S*/([^/\s]+)", r"--base S1/\1", cmd)  # the stage-1 folder, wherever it was
    cmd = re.sub(r"--init-from \S*/([^/\s]+)", r"--init-from V1/\1", cmd)  # the model stage 1 started from
    return re.sub(r"(--out|--cache-dir) (\S*/)?([^/\s]+)", r"\1 \3", cmd)


def _calibrations(folder: Path) -> list[dict]:
    import json

    out = []
    for p in sorted(folder.glob("calibration-*.json")):
        c = json.loads(p.read_text(encoding="utf-8"))
        out.append({"file": p.name, "method": c.get("method", "?"), "n_images": c.get("n_images"),
                    "data": _portable(str(c.get("data", "?"))).replace("\\", "/").split("shared/data/")[-1],
                    "before": c.get("mean_ece_before"), "after": c.get("mean_ece_after"),
                    "threshold_method": c.get("threshold_method", "?")})
    return out


def stage2_card(folder: Path, m: dict) -> str:
    """Render README.md of a stage-2 folder from its metrics.json, its calibration files and, when
    present, `evaluation.json` (within-source rows and the source probe); writes and returns it."""
    import json

    from ..fileio import atomic_write_text

    folder = Path(folder)
    ev_path = folder / "evaluation.json"
    ev = json.loads(ev_path.read_text(encoding="utf-8")) if ev_path.is_file() else None
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    data = [{**d, "sources_text": _counts(d["sources"])} for d in m["data"]]

    def ci_text(v: dict, key: str) -> str:
        ci = (v.get("auc_ci") or {}).get(key)
        return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "n/a"

    size = cfg["preprocess_cfg"]["size"]
    text = render("model_card_stage2.md.j2", name=folder.resolve().name, m={**m, "data": data}, c=m["config"],
                  size=size, ci_text=ci_text, ev=ev, calibrations=_calibrations(folder),
                  has_ood=(folder / "ood-stats.safetensors").is_file(),
                  text_label_sets=_shipped_text_label_sets(folder),
                  attn_targets=[t for t in m["lora_target_linears"] if ".attn." in t],
                  command=_portable(m.get("command")), base_command=_portable(m.get("base_command")),
                  init=_init_info(m), base_size=(m.get("base_config") or {}).get("image_size") or size,
                  grid=int(size) // 32)
    atomic_write_text(folder / "README.md", text)
    return text


def _shipped_text_label_sets(folder: Path) -> str:
    """The label sets text-embeddings.safetensors was made for, as the card names them ('' without one)."""
    from safetensors import safe_open

    path = folder / "text-embeddings.safetensors"
    if not path.is_file():
        return ""
    with safe_open(str(path), framework="np") as f:
        names = (f.metadata() or {}).get("label_sets", "")
    return ", ".join(f"`{n}`" for n in names.split(",") if n)
