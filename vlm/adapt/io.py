"""Adapters as files: one folder per adapter, readable without this package where it matters.

    adapter.json              what it is: method, base model (name + fingerprint), label set, prompt
                              styles, head config, LoRA targets, training settings, metrics
    adapter_config.json       PEFT LoraConfig (LoRA only; `LoraConfig.from_pretrained(dir)`)
    adapter_model.safetensors PEFT LoRA weights (LoRA only; `get_peft_model_state_dict` keys)
    layer_scale.safetensors   trained layer-scale gammas of the targeted attention blocks (LoRA, when used)
    head.safetensors          the classifier head's tensors
    label_set.yaml            copy of the label set the adapter predicts
    metrics.json              evaluation metrics, when the run had evaluation data
    README.md                 generated model card

`save_adapter` writes the folder as a whole (`vlm.fileio.atomic_dir`): a reader never sees a mix of an
old and a new adapter, and a failed save leaves the previous adapter untouched. It replaces an existing
adapter folder but refuses to overwrite a non-empty folder that is not one.
`load_adapter` refuses a folder trained on another base model (fingerprints differ).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..fileio import FileFormatError, atomic_dir, read_json, read_yaml
from ..labels import LabelSet, LabelSetError, parse_label_set
from ..models import Backbone, ModelLoadError
from .heads import build_head

FORMAT = "vlm-xray-adapter"
FORMAT_VERSION = 1


def _label_set_dict(ls: LabelSet) -> dict:
    return {
        "name": ls.name, "display_name": ls.display_name, "description": ls.description, "modality": ls.modality,
        "mode": ls.mode, "prompt_styles": dict(ls.prompt_styles), "normal_labels": list(ls.normal_labels),
        "groups": {g: list(m) for g, m in ls.groups.items()},
        "labels": [{"name": lab.name, "display": lab.display, "description": lab.description,
                    "category": lab.category, "severity": lab.severity, "aliases": list(lab.aliases),
                    "prompts": {s: {"positive": list(p.positive), "negative": list(p.negative)}
                                for s, p in lab.prompts.items()}} for lab in ls.labels],
    }


def _write_label_set(ls: LabelSet, target: Path) -> None:
    src = Path(ls.source) if ls.source else None
    if src is not None and src.is_file():
        try:
            same = parse_label_set(read_yaml(src, what="label-set file"), str(src)) == \
                dataclasses.replace(ls, source=str(src))
        except (FileFormatError, LabelSetError):  # the source changed or broke: write what we hold
            same = False
        if same:
            shutil.copyfile(src, target)
            return
    target.write_text(yaml.safe_dump(_label_set_dict(ls), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _hash_files(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def check_adapter_target(out_dir: str | Path) -> Path:
    """`out_dir` as a Path if an adapter may be written there (absent, empty, or an adapter folder, which
    is replaced); ValueError (a user error) otherwise. Call it before training so a run is not wasted."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose a folder for the adapter")
    if out.is_dir() and any(out.iterdir()) and not (out / "adapter.json").is_file():
        raise ValueError(f"{out} exists and is not an adapter folder (no adapter.json); choose a new or empty "
                              f"folder for the adapter")
    return out


def save_adapter(
    out_dir: str | Path,
    base: Backbone,
    label_set: LabelSet,
    head: torch.nn.Module,
    info: dict,
    *,
    lora_module: torch.nn.Module | None = None,
    lora_config=None,
    extra_state: dict | None = None,
    training: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write an adapter folder as a whole; returns it. `lora_module` is the backbone module with LoRA layers."""
    out = check_adapter_target(out_dir)
    if lora_module is not None and any((head.head_config().get("keep_zero_shot") or {}).values()):
        raise ValueError("a LoRA adapter cannot serve labels by zero-shot on its adapted image embeddings "
                         "(the per-label guard drops the LoRA update instead)")
    with atomic_dir(out) as tmp:
        _write_adapter_files(tmp, out.name, base, label_set, head, info, lora_module, lora_config, extra_state,
                             training, metrics)
    return out


def _write_adapter_files(out: Path, name: str, base: Backbone, label_set: LabelSet, head: torch.nn.Module,
                         info: dict, lora_module, lora_config, extra_state, training, metrics) -> None:
    """Every file of an adapter into the (new, empty) folder `out`; `name` is the adapter's folder name."""
    files = []
    if lora_module is not None:
        from peft import get_peft_model_state_dict

        lora_config.save_pretrained(str(out))
        sd = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(lora_module).items()}
        save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        files.append(out / "adapter_model.safetensors")
        if extra_state:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_state.items()},
                      str(out / "layer_scale.safetensors"))
            files.append(out / "layer_scale.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    files.append(out / "head.safetensors")
    _write_label_set(label_set, out / "label_set.yaml")
    head_cfg = head.head_config()
    digest = _hash_files(*files)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "method": info.get("method"),
        "adapter_hash": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": {"name": base.name, "fingerprint": base.fingerprint, "source": base.source,
                       "layout": base.layout},
        "label_set": {"name": label_set.name, "mode": label_set.mode, "labels": label_set.names,
                      "file": "label_set.yaml"},
        "prompt_styles": head_cfg.get("styles"),
        "head": head_cfg,
        "peft": ({"config": "adapter_config.json", "weights": "adapter_model.safetensors",
                  "layer_scale": "layer_scale.safetensors" if extra_state else None}
                 if lora_module is not None else None),
        "info": info,
        "training": training or {},
        "metrics": metrics,
    }
    (out / "adapter.json").write_text(json.dumps(meta, indent=2, default=_json_default) + "\n", encoding="utf-8")
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n",
                                          encoding="utf-8")
    (out / "README.md").write_text(render_card(meta), encoding="utf-8")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple, Path)):
        return list(o) if not isinstance(o, Path) else str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_adapter_meta(adapter_dir: str | Path) -> dict:
    d = Path(adapter_dir)
    f = d / "adapter.json"
    if not d.is_dir():
        raise FileNotFoundError(f"adapter folder {d} not found")
    if not f.is_file():
        raise ValueError(f"{d} is not an adapter folder (no adapter.json); create one with `vlm-xray finetune`")
    meta = read_json(f, what="adapter description")
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{f}: not a vlm-xray adapter (format {fmt!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{f}: adapter format version {meta['format_version']} is newer than this vlm-xray "
                         f"reads ({FORMAT_VERSION}); upgrade vlm-xray")
    return meta


def load_adapter(adapter_dir: str | Path, backbone: Backbone, label_set: LabelSet | None = None):
    """(adapted backbone, head, label set) for an adapter folder on `backbone`.

    The adapter's own label set (label_set.yaml) replaces `label_set`: the head predicts exactly
    those labels. A LoRA adapter is applied to a copy of the backbone's module, and the returned
    backbone's fingerprint is the base fingerprint + the adapter hash, so image-embedding caches of
    the base and the adapted model never mix. Head-only adapters (linear probe, Tip-Adapter) leave
    the image embeddings unchanged and keep the base fingerprint.
    """
    d = Path(adapter_dir)
    meta = read_adapter_meta(d)
    want = meta["base_model"]
    if want["fingerprint"] != backbone.fingerprint:
        raise ModelLoadError(
            f"adapter {d} was trained on base model {want['name']!r} (fingerprint {want['fingerprint']}), "
            f"but the loaded model is {backbone.name!r} (fingerprint {backbone.fingerprint}). "
            f"Pass --model {want['name']} (or the checkpoint it was trained on).")
    ls_file = d / meta["label_set"].get("file", "label_set.yaml")
    adapter_ls = parse_label_set(read_yaml(ls_file, what="adapter label set"), str(ls_file))
    head = build_head(meta["head"], load_file(str(d / "head.safetensors"))).to(backbone.device)
    if meta.get("peft") and any((meta["head"].get("keep_zero_shot") or {}).values()):
        # a zero-shot label is scored on the embedding the head sees: with a LoRA update that is not zero-shot
        raise ValueError(f"{d}: a LoRA adapter cannot serve labels by zero-shot (keep_zero_shot) on its adapted "
                         f"image embeddings; this adapter folder is inconsistent")
    if meta.get("peft"):
        from peft import LoraConfig

        from .lora import apply_lora

        config = LoraConfig.from_pretrained(str(d))
        sd = load_file(str(d / meta["peft"]["weights"]), device=str(backbone.device))
        extra = (load_file(str(d / meta["peft"]["layer_scale"]), device=str(backbone.device))
                 if meta["peft"].get("layer_scale") else None)
        try:
            module = apply_lora(backbone.module, config, sd, extra)
        except ValueError as e:
            raise ValueError(f"{d}: {e}") from e
        backbone = dataclasses.replace(backbone, module=module,
                                       fingerprint=f"{backbone.fingerprint}-adapter-{meta['adapter_hash']}")
    return backbone, head, adapter_ls


# ----------------------------------------------------------------------------- model card

def render_card(meta: dict) -> str:
    from ..html import render

    info = meta.get("info", {})
    per_label = []
    m = meta.get("metrics") or {}
    ev = m.get("adapter") or {}
    zs = m.get("zero_shot") or {}
    for name in (ev.get("per_label") or {}):
        a = ev["per_label"].get(name)
        z = (zs.get("per_label") or {}).get(name)
        per_label.append({"name": name, "adapter": a, "zero_shot": z,
                          "delta": (a - z) if (a is not None and z is not None) else None})
    return render("adapter_card.md.j2", meta=meta, info=info, metrics=m, per_label=per_label,
                  training=meta.get("training", {}))
