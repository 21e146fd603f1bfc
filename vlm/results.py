"""Result types and their JSON/CSV form: the public schema other tools rely on."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field


@dataclass
class Finding:
    label: str
    probability: float
    uncertainty: float  # std across preprocessing variants x prompt styles
    positive: bool
    threshold: float
    display: str = ""
    category: str = ""
    severity: int = 1

    def to_dict(self) -> dict:
        return dict(vars(self))  # = asdict (flat fields, same order) without its deep copies


@dataclass
class ImageResult:
    image: str
    image_id: str
    model: str
    label_set: str
    threshold: float | None  # None when per-label (calibrated) thresholds are used
    variants: list[str]
    prompt_styles: list[str]
    findings: list[Finding]
    # per_variant[variant][style][label] = probability
    per_variant: dict[str, dict[str, dict[str, float]]]
    view: str | None = None
    size: tuple[int, int] | None = None
    adapter: str | None = None
    calibration: str | None = None
    extra: dict = field(default_factory=dict)
    # what the loader noticed about the input (first frame of several used, a lateral view, a body part
    # outside the label set): shown in reports; a signal for the out-of-distribution guard
    input_warnings: list[str] = field(default_factory=list)
    # the out-of-distribution verdict (vlm.ood.OODVerdict.to_dict()): in_distribution, score, threshold,
    # reason, method, details; None when the guard is off
    ood: dict | None = None
    # heatmaps of (positive) findings (vlm.explain.Heatmap.to_dict(): label, method, peak, score, crop_box,
    # files); a "data_uri" key (inline PNG for HTML reports) is kept in memory only, never written to JSON
    heatmaps: list[dict] = field(default_factory=list)

    def finding(self, label: str) -> Finding:
        return next(f for f in self.findings if f.label == label)

    @property
    def positives(self) -> list[Finding]:
        """Positive findings in impression order: severity first, then probability."""
        return sorted((f for f in self.findings if f.positive), key=lambda f: (-f.severity, -f.probability))

    def to_dict(self) -> dict:
        d = {
            "image": self.image,
            "image_id": self.image_id,
            "model": self.model,
            "label_set": self.label_set,
            "threshold": self.threshold,
            "variants": self.variants,
            "prompt_styles": self.prompt_styles,
            "findings": [f.to_dict() for f in self.findings],
            "per_variant": self.per_variant,
            "view": self.view,
            "size": list(self.size) if self.size else None,
            "input_warnings": list(self.input_warnings),
        }
        if self.adapter:
            d["adapter"] = self.adapter
        if self.calibration:
            d["calibration"] = self.calibration
        if self.ood is not None:
            d["ood"] = dict(self.ood)
        if self.heatmaps:
            d["heatmaps"] = [{k: v for k, v in h.items() if k != "data_uri"} for h in self.heatmaps]
        if self.extra:
            d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageResult":
        known = {"image", "image_id", "model", "label_set", "threshold", "variants", "prompt_styles",
                 "findings", "per_variant", "view", "size", "adapter", "calibration", "input_warnings", "ood",
                 "heatmaps"}
        return cls(
            image=d["image"], image_id=d["image_id"], model=d["model"], label_set=d["label_set"],
            threshold=d["threshold"], variants=list(d["variants"]), prompt_styles=list(d["prompt_styles"]),
            findings=[Finding(**f) for f in d["findings"]], per_variant=d["per_variant"], view=d.get("view"),
            size=tuple(d["size"]) if d.get("size") else None, adapter=d.get("adapter"),
            calibration=d.get("calibration"), extra={k: v for k, v in d.items() if k not in known},
            input_warnings=list(d.get("input_warnings") or []),
            ood=dict(d["ood"]) if d.get("ood") is not None else None,
            heatmaps=[dict(h) for h in d.get("heatmaps") or []],
        )


@dataclass
class ImageFailure:
    image: str
    reason: str

    def to_dict(self) -> dict:
        return {"image": self.image, "error": self.reason}


FINDINGS_CSV_COLUMNS = ["image", "image_id", "label", "probability", "uncertainty", "positive", "threshold", "model",
                        "label_set"]


def findings_rows(results: list[ImageResult]) -> list[dict]:
    """One row per image x label (the batch findings.csv / findings.json form)."""
    return [
        {"image": r.image, "image_id": r.image_id, "label": f.label, "probability": round(f.probability, 6),
         "uncertainty": round(f.uncertainty, 6), "positive": f.positive, "threshold": f.threshold,
         "model": r.model, "label_set": r.label_set}
        for r in results for f in r.findings
    ]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
