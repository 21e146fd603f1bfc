"""Checkpoints: the open_clip weights file (safetensors, fp16) and the resumable training state
(`train_state.pt`, torch.save of tensors and strings only, so it loads with weights_only=True)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import atomic_path

WEIGHTS_FILE = "open_clip_model.safetensors"
STATE_FILE = "train_state.pt"


def write_weights(model, path: Path, include_text: bool) -> None:
    """Image tower, text projection and logit scale (plus the text transformer when `include_text`,
    LoRA merged into plain BERT names, which is what open_clip builds) in fp16, atomically."""
    from safetensors.torch import save_file

    sd = {}
    peft_text = include_text and hasattr(model.text.transformer, "merge_adapter")
    if peft_text:
        model.text.transformer.merge_adapter()
    try:
        for k, v in model.state_dict().items():
            if (k.startswith("text.transformer.") and not include_text) or k.endswith("position_ids") or "lora_" in k:
                continue
            k = k.replace("text.transformer.base_model.model.", "text.transformer.").replace(".base_layer.", ".")
            v = v.detach().cpu()
            sd[k] = (v.half() if v.is_floating_point() else v).contiguous()
    finally:
        if peft_text:
            model.text.transformer.unmerge_adapter()
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "producer": "vlm.pretrain"})


def load_weights(model, path: Path) -> None:
    """Load a weights file written by `write_weights` into `model` (fp32), exactly as stored."""
    from safetensors.torch import load_file

    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or not all(k.startswith("text.transformer.") for k in missing):
        raise RuntimeError(f"{path}: does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def save_train_state(path: Path, model, optimizer, *, epoch: int, step: int, best: float, elapsed: float,
                     history: list, run_config: dict, gen: torch.Generator) -> None:
    state = {
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith("text.transformer.")
                  or "lora_" in k},
        "optimizer": optimizer.state_dict(), "elapsed": elapsed, "epoch": epoch, "best": best, "step": step,
        "history": json.dumps(history), "config": json.dumps(run_config),
        "gen_state": gen.get_state(), "rng_state": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path) -> dict:
    """The saved state with `config` and `history` decoded (weights_only: nothing is unpickled)."""
    st = torch.load(path, map_location="cpu", weights_only=True)
    return {**st, "config": json.loads(st["config"]), "history": json.loads(st["history"])}
