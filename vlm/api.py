"""The library's front door: `load_scorer` turns names and paths into a ready `Scorer`.

Every command, the HTTP API and a Python user build scorers here, so the same options give
the same numbers everywhere:

    from vlm import load_scorer
    scorer = load_scorer("vlm-xray-starter", labels="chestxray14")
    for result in scorer.score(["a.png", "b.dcm"], threshold=0.4):
        print(result.to_dict())
"""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO = "auto"


def resolve_device(device: str | None = "auto") -> str:
    """'auto' -> cuda when available, else cpu; a cuda device on a machine without CUDA is an error."""
    import torch

    device = device or AUTO
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use device 'cpu'")
    return device


def resolve_calibration(calibration, backbone, label_set, adapter=None):
    """The calibration a scorer uses.

    "auto": the calibration the model folder ships for this label set (fitted on data the model
    was trained with), unless an adapter replaces the prompt classifier; None or "none": raw
    prompt probabilities; a path: that `vlm-xray calibrate` file; a `Calibration`: itself.
    """
    from .calibrate import Calibration, load_calibration

    if calibration is None or calibration == "none":
        return None
    if isinstance(calibration, Calibration):
        return calibration
    if calibration == AUTO:
        shipped = None if adapter else backbone.calibration_for(label_set.name)
        if shipped is not None:
            logger.debug("using the calibration %s shipped with %s", shipped.name, backbone.name)
        return load_calibration(shipped, label_set) if shipped is not None else None
    return load_calibration(calibration, label_set)


def load_scorer(
    model: str | None = None,
    labels="chestxray14",
    adapter: str | Path | None = None,
    calibration="auto",
    variants: list[str] | str | None = None,
    prompt_styles: list[str] | None = None,
    device: str = AUTO,
    batch_size: int = 16,
    num_workers: int | None = None,
    image_cache=None,
    text_cache=None,
    load_options=None,
    ood: str = "warn",
):
    """A ready `Scorer`: model (registry name or path; None = the bundled starter) + label set
    (name, YAML path or `LabelSet`) + optional few-shot adapter folder + calibration (see
    `resolve_calibration`), scoring the given preprocessing variants and prompt styles.

    load_options: how inputs are read (`vlm.images.LoadOptions`: DICOM window, pixel limit, PHI).
    ood: "warn" (each result carries an `ood` verdict), "reject" (out-of-distribution images become
    failures) or "off"; the guard is the base model's (`vlm.ood.OODGuard`)."""
    from .labels import LabelSet, load_label_set
    from .models import load_model
    from .scoring import Scorer
    from .text_cache import TextEmbeddingCache

    label_set = labels if isinstance(labels, LabelSet) else load_label_set(labels)
    # no adapter: the text tower is only built if a prompt embedding is not in the store
    backbone = load_model(model, device=resolve_device(device), defer_text=not adapter)
    text_cache = text_cache or TextEmbeddingCache()
    base, head = backbone, None
    if adapter:
        from .adapt import load_adapter

        backbone, head, label_set = load_adapter(adapter, backbone, label_set)
    guard = ood_guard(base, label_set, ood, text_cache)  # the base model's statistics (LoRA copies the module)
    return Scorer(
        backbone, label_set, list(prompt_styles or []) or None, variants, batch_size=batch_size,
        num_workers=num_workers, text_cache=text_cache, image_cache=image_cache, head=head,
        adapter_name=str(adapter) if adapter else None,
        calibration=resolve_calibration(calibration, backbone, label_set, adapter),
        load_options=load_options, ood_guard=guard, ood_mode=ood,
    )


def ood_guard(backbone, label_set, mode: str, text_cache=None):
    """The OOD guard for (model, label set), or — in warn mode — the reason there is none, which
    every result then carries. In reject mode a missing guard is an error: nothing could be rejected."""
    if mode == "off":
        return None
    from .ood import OODError, OODGuard, OODUnavailable

    try:
        return OODGuard.for_model(backbone, label_set, text_cache=text_cache)
    except OODUnavailable as e:
        if mode == "reject":
            raise ValueError(f"--ood reject: {e}") from e
        logger.warning("OOD guard unavailable: %s", e)
        return str(e)
    except OODError as e:
        raise ValueError(str(e)) from e
