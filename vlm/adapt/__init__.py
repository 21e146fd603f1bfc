"""Few-shot adaptation: LoRA on the attention projections (PEFT), linear probe, Tip-Adapter.

    finetune(backbone, label_set, data, method="lora", shots=16, out_dir=...)  -> Adapted
    load_adapter(adapter_dir, backbone, label_set) -> (adapted backbone, head, label set)
    run_study(...)  few-shot study: macro AUC vs shots per method (vlm.adapt.study)
    guard_head(...) the per-label never-worse guard every method ends with (vlm.adapt.guard)

Every method writes the same adapter folder (see `vlm.adapt.io`); `--adapter DIR` makes
analyze / batch / eval score with it through `Scorer(head=...)`.

Names are imported lazily so that `vlm-xray --help` does not pay for torch/PEFT.
"""
from __future__ import annotations

import importlib

# head-only: the LoRA path with LoRA frozen at its no-op init (lr 0) - the same head on the same shots,
# so `lora` vs `head-only` measures what the attention update adds
METHODS = ("lora", "head-only", "linear-probe", "tip-adapter")
LORA_METHODS = {"lora": {}, "head-only": {"lr": 0.0, "layer_scale": "off"}}

_LAZY = {
    "load_adapter": "io", "save_adapter": "io", "read_adapter_meta": "io",
    "finetune": "core", "Adapted": "core", "evaluate_adapter": "core", "exclude_groups": "core",
    "validation_set": "core",
    "adapter_probabilities": "core",
    "LoraSettings": "lora", "LoraTargetError": "lora", "detect_targets": "lora", "find_candidates": "lora",
    "verify_targets": "lora", "train_lora": "lora",
    "train_linear_probe": "baselines", "train_tip_adapter": "baselines",
    "run_study": "study",
    "guard_head": "guard", "source_matched_sample": "guard",
}

__all__ = ["METHODS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
