"""Out-of-distribution guard: is this image what the model (and the label set) was made for?

Two signals, both from what the model itself knows:

- **embedding distance** (when the model folder ships `ood-stats.safetensors`): the Mahalanobis
  distance of the image embedding to the embeddings of the model's own training images of the label
  set's domain (e.g. "chest" for chestxray14 and chest4). Mean and a Ledoit-Wolf shrunk precision
  matrix are fitted on the training side of the patient split; the threshold is a percentile of the
  distances of *held-out* patients' images (never the fitting images). Made by `fit_ood_stats` /
  `python -m vlm.ood fit` (see `main`), and re-made whenever the model is retrained: the file records
  the weights' fingerprint and a mismatch is an error.
- **modality prompts** (`prompts/modality/*.yaml`, data): zero-shot "a chest X-ray" vs "a
  dermoscopy photo", "a photograph", "a document", ... The expected modality's share of the softmax
  must reach `min_expected`. Used when the model ships no statistics for the domain (e.g. BiomedCLIP),
  or together with them when asked.

    guard = OODGuard.for_model(backbone, label_set)      # OODUnavailable when neither signal exists
    verdict = guard.check(embeddings (V, D), variants)   # -> OODVerdict(in_distribution, score, threshold, reason)
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

STATS_FILE = "ood-stats.safetensors"
DEFAULT_PERCENTILE = 99.0
DEFAULT_MIN_EXPECTED = 0.5
FIT_VARIANT = "original"
FEATURE_SUFFIX = "@features"  # stats-file domain name of a domain's stage-feature statistics


class OODError(ValueError):
    """OOD statistics or modality prompts are malformed, stale or inconsistent."""


class OODUnavailable(OODError):
    """Neither OOD statistics nor modality prompts exist for this model and label set."""


@dataclass
class OODVerdict:
    in_distribution: bool
    score: float | None  # Mahalanobis distance (or 1 - expected-modality share for prompts only)
    threshold: float | None
    reason: str
    method: str  # "mahalanobis", "modality-prompts" or "mahalanobis+modality-prompts"
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = None if self.score is None else round(float(self.score), 4)
        d["threshold"] = None if self.threshold is None else round(float(self.threshold), 4)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OODVerdict":
        return cls(in_distribution=bool(d["in_distribution"]), score=d.get("score"), threshold=d.get("threshold"),
                   reason=str(d.get("reason", "")), method=str(d.get("method", "")), details=dict(d.get("details") or {}))


# ----------------------------------------------------------------------------------- statistics

@dataclass
class DomainStats:
    """Embedding statistics of one domain (e.g. chest X-rays) of a model's training images."""

    name: str
    label_sets: tuple[str, ...]
    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D)
    threshold: float
    info: dict = field(default_factory=dict)  # how the threshold was chosen, counts, sources

    def distance(self, emb: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) Mahalanobis distances."""
        diff = np.atleast_2d(emb).astype(np.float64) - self.mean
        # (diff @ P) . diff: one matrix product; a three-operand einsum took ~0.7 ms per image
        return np.sqrt(np.maximum(np.einsum("nd,nd->n", diff @ self.precision, diff), 0.0))


def fit_domain(name: str, label_sets: Sequence[str], fit_emb: np.ndarray, held_out: dict[str, np.ndarray],
               percentile: float = DEFAULT_PERCENTILE) -> DomainStats:
    """Mean + Ledoit-Wolf precision on `fit_emb` (N, D); threshold = `percentile` of the distances
    of all held-out images pooled (held_out: source -> (M, D))."""
    from sklearn.covariance import LedoitWolf

    if len(fit_emb) < 10:
        raise OODError(f"domain {name!r}: {len(fit_emb)} fitting images are too few for embedding statistics")
    pooled = np.concatenate([e for e in held_out.values() if len(e)]) if held_out else np.empty((0,))
    if len(pooled) < 20:
        raise OODError(f"domain {name!r}: {len(pooled)} held-out images are too few to choose a threshold")
    lw = LedoitWolf().fit(fit_emb.astype(np.float64))
    stats = DomainStats(name, tuple(label_sets), lw.location_, lw.precision_, 0.0)
    dist = stats.distance(pooled)
    stats.threshold = float(np.percentile(dist, percentile))
    per_source = {src: {"n": int(len(e)), "false_alarm_rate": round(float((stats.distance(e) > stats.threshold).mean()), 4)}
                  for src, e in held_out.items() if len(e)}
    stats.info = {"n_fit": int(len(fit_emb)), "n_threshold": int(len(pooled)), "percentile": percentile,
                  "shrinkage": round(float(lw.shrinkage_), 4),
                  "threshold_rule": f"{percentile:g}th percentile of the Mahalanobis distances of held-out-patient "
                                    f"images (not used for fitting)",
                  "held_out_false_alarms": per_source}
    return stats


# ----------------------------------------------------------------------------------- tower features

def _stage_modules(module) -> tuple[list, bool]:
    """The image tower's stages/blocks whose outputs summarise image style, and whether their
    token outputs are sequence-first. Embeddings alone collapse far-away inputs (grey photographs,
    text pages) onto the training manifold; the stages' channel statistics do not."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = getattr(module, "visual", None)
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        if hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
            return list(trunk.blocks), False
        if getattr(trunk, "feature_info", None):
            return [trunk.get_submodule(f["module"]) for f in trunk.feature_info], False
    if isinstance(visual, VisionTransformer):
        return list(visual.transformer.resblocks), not getattr(visual.transformer, "batch_first", True)
    if isinstance(visual, ModifiedResNet):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], False
    vision = getattr(getattr(module, "model", None), "vision_model", None)
    if vision is not None:
        return list(vision.encoder.layers), False
    raise OODError(f"no stage features known for image tower {type(visual or module).__name__}")


class StageFeatures:
    """Forward hooks on the image tower's stages that pool their outputs while the encoder runs: per
    stage, the mean and standard deviation of each channel over positions (conv) or tokens (ViT),
    concatenated. `rows` picks the batch rows to pool (e.g. the 'original' variant of each image in a
    batch of all variants), so the stage features come from the same forward pass as the embeddings.

        with StageFeatures(backbone, rows) as sf:
            emb = backbone.encode_images(pixels)
        feats = sf.features()  # (len(rows), F)
    """

    def __init__(self, backbone, rows: Sequence[int] | None = None):
        self.stages, self.seq_first = _stage_modules(backbone.module)
        self.rows = None if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        self.pooled: list[torch.Tensor] = []
        self._handles: list = []
        self._thread: int | None = None

    def _hook(self, _mod, _inp, out):
        if threading.get_ident() != self._thread:
            return  # another encoder stream's pass through the same module
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() != 4:
            out = out.transpose(0, 1) if self.seq_first else out
        if self.rows is not None:
            out = out[self.rows.to(out.device)]
        axes = (2, 3) if out.dim() == 4 else 1
        self.pooled.append(torch.cat([out.mean(axes), out.std(axes)], 1).float())

    def __enter__(self) -> "StageFeatures":
        self._thread = threading.get_ident()  # hooks see every thread's passes; this one pools its own
        self._handles = [m.register_forward_hook(self._hook) for m in self.stages]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def features(self) -> np.ndarray:
        return torch.cat(self.pooled, 1).cpu().numpy()


@torch.no_grad()
def encode_with_features(backbone, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(normalised embeddings (N, D), stage features (N, F)) of a batch (see `StageFeatures`)."""
    with StageFeatures(backbone) as sf:
        emb = backbone.encode_images(pixels.to(backbone.device)).float()
    return emb.cpu().numpy(), sf.features()


def save_stats(path: str | Path, domains: Sequence[DomainStats], fingerprint: str, extra: dict | None = None) -> None:
    from safetensors.numpy import save_file

    from .fileio import atomic_path

    tensors, meta = {}, {"fingerprint": fingerprint, "variant": FIT_VARIANT, "domains": {}, **(extra or {})}
    for d in domains:
        tensors[f"{d.name}.mean"] = d.mean.astype(np.float32)
        tensors[f"{d.name}.precision"] = d.precision.astype(np.float32)
        meta["domains"][d.name] = {"label_sets": list(d.label_sets), "threshold": d.threshold, **d.info}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"ood": json.dumps(meta)})


def load_stats(path: str | Path) -> tuple[dict, dict[str, DomainStats]]:
    """(metadata, domain name -> DomainStats) from a stats file; OODError naming the file when malformed."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["ood"])
            domains = {}
            for name, d in meta["domains"].items():
                domains[name] = DomainStats(name, tuple(d["label_sets"]), f.get_tensor(f"{name}.mean").astype(np.float64),
                                            f.get_tensor(f"{name}.precision").astype(np.float64), float(d["threshold"]),
                                            {k: v for k, v in d.items() if k not in ("label_sets", "threshold")})
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
        raise OODError(f"{path}: not a readable OOD statistics file ({type(e).__name__}: {e}); re-make it with "
                       f"`python -m vlm.ood fit`") from e
    return meta, domains


# ----------------------------------------------------------------------------------- modality prompts

@dataclass(frozen=True)
class ModalityPrompts:
    source: str
    label_sets: tuple[str, ...]
    expected: dict[str, tuple[str, ...]]  # modality name -> prompts (in-distribution)
    others: dict[str, tuple[str, ...]]  # modality name -> prompts (out of distribution)
    min_expected: float = DEFAULT_MIN_EXPECTED


def _modality_dirs() -> list[Path]:
    from .labels import builtin_prompt_dir

    dirs = [Path(d) / "modality" for d in os.environ.get("VLM_XRAY_PROMPTS", "").split(os.pathsep) if d]
    return dirs + [builtin_prompt_dir() / "modality"]


def _prompt_groups(raw, where: str, file: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict) or not raw:
        raise OODError(f"{file}: {where} must be a non-empty mapping of modality name -> list of prompts")
    out = {}
    for name, prompts in raw.items():
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise OODError(f"{file}: {where}.{name} must be a non-empty list of prompt strings")
        out[str(name)] = tuple(p.strip() for p in prompts)
    return out


def parse_modality_prompts(data, file: str) -> ModalityPrompts:
    if not isinstance(data, dict):
        raise OODError(f"{file}: top level must be a mapping with label_sets, expected, others")
    sets = data.get("label_sets")
    if not isinstance(sets, list) or not sets or not all(isinstance(s, str) for s in sets):
        raise OODError(f"{file}: label_sets must be a non-empty list of label-set names")
    min_expected = data.get("min_expected", DEFAULT_MIN_EXPECTED)
    if not isinstance(min_expected, (int, float)) or not 0 < min_expected < 1:
        raise OODError(f"{file}: min_expected must be a number in (0, 1), got {min_expected!r}")
    expected = _prompt_groups(data.get("expected"), "expected", file)
    others = _prompt_groups(data.get("others"), "others", file)
    clash = sorted(set(expected) & set(others))
    if clash:
        raise OODError(f"{file}: modality name(s) {', '.join(clash)} are both expected and other")
    return ModalityPrompts(file, tuple(sets), expected, others, float(min_expected))


def modality_prompts_for(label_set_name: str) -> ModalityPrompts | None:
    """The first modality-prompt file (user folders first) that lists this label set, or None."""
    from .fileio import read_yaml

    for d in _modality_dirs():
        for f in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            mp = parse_modality_prompts(read_yaml(f, what="modality prompts"), str(f))
            if label_set_name in mp.label_sets:
                return mp
    return None


class ModalityClassifier:
    """Zero-shot softmax over ensembled modality prompts."""

    def __init__(self, prompts: ModalityPrompts, embed_texts, logit_scale: float):
        from .prompt_classifier import ensemble

        self.prompts = prompts
        self.names = list(prompts.expected) + list(prompts.others)
        groups = list(prompts.expected.values()) + list(prompts.others.values())
        texts = [t for g in groups for t in g]
        table = dict(zip(texts, embed_texts(texts)))
        self.weights = torch.stack([ensemble(torch.stack([table[t] for t in g])) for g in groups]).float().cpu()
        self.n_expected = len(prompts.expected)
        self.logit_scale = logit_scale

    def expected_share(self, emb: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(N, D) -> (share of the expected modalities (N,), most likely modality per image)."""
        p = (self.logit_scale * torch.from_numpy(np.atleast_2d(emb)).float() @ self.weights.T).softmax(-1)
        top = [self.names[i] for i in p.argmax(-1).tolist()]
        return p[:, : self.n_expected].sum(-1).numpy(), top


# ----------------------------------------------------------------------------------- the guard

def stats_path_for(backbone) -> Path | None:
    """Where a model's OOD statistics live: `ood-stats.safetensors` in its folder."""
    src = Path(backbone.source) if getattr(backbone, "source", "") else None
    if src is None:
        return None
    folder = src if src.is_dir() else src.parent
    return folder / STATS_FILE


class OODGuard:
    """In-distribution verdicts for one (model, label set)."""

    def __init__(self, label_set_name: str, stats: DomainStats | None = None,
                 modality: ModalityClassifier | None = None, stats_source: str | None = None,
                 feature_stats: DomainStats | None = None, backbone=None):
        if stats is None and modality is None:
            raise OODUnavailable(f"no OOD check for label set {label_set_name!r}: no statistics and no modality prompts")
        self.label_set_name, self.stats, self.modality, self.stats_source = label_set_name, stats, modality, stats_source
        self.feature_stats, self.backbone = feature_stats, backbone

    @classmethod
    def for_model(cls, backbone, label_set, use_prompts: bool | None = None, text_cache=None,
                  stats_file: str | Path | None = None) -> "OODGuard":
        """The model's shipped statistics for the label set's domain, plus modality prompts when
        `use_prompts` (default: only when there are no statistics). OODUnavailable when neither
        exists; OODError when the statistics were made for other weights (re-run `python -m vlm.ood fit`)."""
        name = label_set.name
        path = Path(stats_file) if stats_file else stats_path_for(backbone)
        stats = feature_stats = None
        if path is not None and path.is_file():
            meta, domains = load_stats(path)
            if meta.get("fingerprint") != backbone.fingerprint:
                raise OODError(
                    f"{path}: OOD statistics were made for weights {meta.get('fingerprint')!r}, but {backbone.name} has "
                    f"fingerprint {backbone.fingerprint!r} (retrained?). Re-make them: python -m vlm.ood fit --model "
                    f"{backbone.source} --data ... --out {path.parent}")
            stats = next((d for k, d in domains.items() if name in d.label_sets and not k.endswith(FEATURE_SUFFIX)), None)
            feature_stats = domains.get(f"{stats.name}{FEATURE_SUFFIX}") if stats is not None else None
        modality = None
        if use_prompts or (use_prompts is None and stats is None):
            prompts = modality_prompts_for(name)
            if prompts is not None:
                from .text_cache import TextEmbeddingCache

                cache = text_cache or TextEmbeddingCache()
                modality = ModalityClassifier(prompts, lambda texts: cache.embed(backbone, texts), backbone.logit_scale)
            elif use_prompts:
                raise OODUnavailable(f"no modality prompts list label set {name!r} (prompts/modality/*.yaml)")
        if stats is None and modality is None:
            raise OODUnavailable(
                f"no OOD check for {backbone.name} with label set {name!r}: the model ships no {STATS_FILE} for it "
                f"and no prompts/modality/*.yaml lists it; add one, or turn the guard off (--ood off)")
        return cls(name, stats, modality, str(path) if stats is not None else None, feature_stats, backbone)

    @property
    def method(self) -> str:
        return "+".join(m for m, on in (("mahalanobis", self.stats), ("stage-features", self.feature_stats),
                                        ("modality-prompts", self.modality)) if on is not None)

    def describe(self) -> dict:
        """How the verdict is made (for reports and cards)."""
        d = {"method": self.method, "label_set": self.label_set_name}
        if self.stats is not None:
            d.update(domain=self.stats.name, threshold=self.stats.threshold, stats_file=self.stats_source,
                     threshold_rule=self.stats.info.get("threshold_rule"), n_fit=self.stats.info.get("n_fit"))
        if self.feature_stats is not None:
            d.update(feature_threshold=self.feature_stats.threshold)
        if self.modality is not None:
            d.update(modality_prompts=self.modality.prompts.source, min_expected=self.modality.prompts.min_expected)
        return d

    def check_image(self, image) -> OODVerdict:
        """The full verdict for one image (path, vlm Image or uint8 pixels): its 'original' variant is
        encoded once for the embedding and the stage features. Use this where the image is at hand."""
        from .transforms import model_tensors

        if self.backbone is None:
            raise OODError("this guard was built without a backbone; use OODGuard.for_model")
        pixels = image if isinstance(image, np.ndarray) else getattr(image, "pixels", None)
        if pixels is None:
            from .images import load_image

            pixels = load_image(image).pixels
        b = self.backbone
        emb, feats = encode_with_features(b, model_tensors([pixels], b.image_size, b.mean, b.std))
        return self._verdict(emb, features=feats)

    def check(self, embeddings, variants: Sequence[str] | None = None, features=None) -> OODVerdict:
        """embeddings: (V, D) normalised image embeddings of one image (rows = `variants`) or (D,);
        features: its 'original' stage features (F,) from `encode_with_features`, when at hand.
        Statistics were fitted on the 'original' variant, so that row is used when `variants` names
        it; otherwise every row is scored and the median is used (the reason says so). Without
        `features` the stage-feature test is skipped and `details["signals"]` says so: prefer
        `check_image`, which never skips it."""
        emb = np.atleast_2d(np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor)
                                       else embeddings, dtype=np.float32))
        note = ""
        if variants is not None and FIT_VARIANT in variants:
            emb = emb[[list(variants).index(FIT_VARIANT)]]
        elif len(emb) > 1:
            note = f" (median over variants {', '.join(variants or [])}; statistics are for '{FIT_VARIANT}')"
        return self._verdict(emb, note, None if features is None else np.atleast_2d(features))

    def check_batch(self, embeddings: np.ndarray, features: np.ndarray | None = None) -> list[OODVerdict]:
        """(N, D) embeddings (+ (N, F) stage features) of N images ('original' variant) -> N verdicts."""
        emb = np.asarray(embeddings, dtype=np.float32)
        return [self._verdict(emb[i:i + 1], features=None if features is None else features[i:i + 1])
                for i in range(len(emb))]

    def _verdict(self, emb: np.ndarray, note: str = "", features: np.ndarray | None = None) -> OODVerdict:
        reasons, details, ok = [], {"signals": []}, True
        score = threshold = None
        if self.stats is not None:
            score = float(np.median(self.stats.distance(emb)))
            threshold = self.stats.threshold
            details.update(domain=self.stats.name)
            details["signals"].append("embedding")
            if score > threshold:
                ok = False
                reasons.append(f"embedding is far from this model's {self.stats.name} training images "
                               f"(distance {score:.1f} > threshold {threshold:.1f}){note}")
        if self.feature_stats is not None and features is not None:
            fscore = float(self.feature_stats.distance(features)[0])
            details.update(feature_score=round(fscore, 4), feature_threshold=round(self.feature_stats.threshold, 4))
            details["signals"].append("stage-features")
            if fscore > self.feature_stats.threshold:
                ok = False
                reasons.append(f"image statistics inside the model are unlike its {self.stats.name} training images "
                               f"(stage-feature distance {fscore:.1f} > {self.feature_stats.threshold:.1f})")
        elif self.feature_stats is not None:
            details["skipped"] = "stage-features (no features passed; use check_image)"
        if self.modality is not None:
            share, top = self.modality.expected_share(emb)
            share = float(np.median(share))
            details.update(expected_modality_share=round(share, 4), most_likely_modality=top[0])
            details["signals"].append("modality-prompts")
            if score is None:
                score, threshold = 1.0 - share, 1.0 - self.modality.prompts.min_expected
            if share < self.modality.prompts.min_expected:
                ok = False
                reasons.append(f"looks like {top[0]!r} rather than {' / '.join(self.modality.prompts.expected)} "
                               f"(expected-modality share {share:.2f} < {self.modality.prompts.min_expected:.2f})")
        reason = "; ".join(reasons) if reasons else f"within what the model saw for {self.label_set_name}"
        return OODVerdict(ok, score, threshold, reason, self.method, details)


# ----------------------------------------------------------------------------------- fitting

def embed_paths(backbone, paths: Sequence[str], batch_size: int = 64,
                with_features: bool = False):
    """'original'-variant embeddings (N, D) of the readable paths (+ stage features (N, F) when
    `with_features`), and the paths that failed."""
    from .images import ImageLoadError, load_image
    from .transforms import model_tensors

    backbone.module.eval()
    embs, feats, failed = [], [], []
    for i in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[i:i + batch_size]:
            try:
                pixels.append(load_image(p).pixels)
            except ImageLoadError as e:
                logger.warning("OOD fit: skipping %s: %s", p, e)
                failed.append(p)
        if pixels:
            e, f = encode_with_features(backbone, model_tensors(pixels, backbone.image_size, backbone.mean,
                                                                 backbone.std))
            embs.append(e)
            feats.append(f)
    emb = np.concatenate(embs) if embs else np.empty((0, 0), np.float32)
    if with_features:
        return emb, (np.concatenate(feats) if feats else np.empty((0, 0), np.float32)), failed
    return emb, failed


def split_csv(csv_path: str | Path, val_fraction: float = 0.15, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{"fit"|"held_out": {source: [image paths]}} of a labels.csv by the seeded patient split
    (vlm.data.patient_split: the bundled starters' own split with fraction 0.15, seed 0)."""
    from .data import group_key, patient_split, read_csv_table

    csv_path = Path(csv_path)
    rows = read_csv_table(csv_path)
    train, val = patient_split([group_key(csv_path, r) for r in rows], val_fraction, seed)
    out: dict[str, dict[str, list[str]]] = {"fit": {}, "held_out": {}}
    for side, idx in (("fit", train), ("held_out", val)):
        for i in idx:
            src = (rows[i].get("source") or "").strip() or csv_path.parent.name
            out[side].setdefault(src, []).append(str(csv_path.parent / rows[i]["filename"]))
    return out


def fit_ood_stats(backbone, domains: dict[str, dict], out_dir: str | Path | None = None,
                  val_fraction: float = 0.15, seed: int = 0, percentile: float = DEFAULT_PERCENTILE,
                  max_fit_per_source: int | None = None, batch_size: int = 64) -> list[DomainStats]:
    """Fit per-domain statistics and write `out_dir/ood-stats.safetensors` when out_dir is given.

    domains: name -> {"label_sets": [...], "data": [labels.csv or folder holding one, ...]}. Each CSV
    is split by patient exactly as the model was trained (val_fraction, seed): the training side
    fits mean/covariance, the held-out side chooses the threshold."""
    fitted = []
    for name, spec in domains.items():
        fit_paths: list[str] = []
        held_out: dict[str, list[str]] = {}
        for data in spec["data"]:
            csv_path = Path(data) / "labels.csv" if Path(data).is_dir() else Path(data)
            parts = split_csv(csv_path, val_fraction, seed)
            for src, paths in parts["fit"].items():
                fit_paths += paths[:max_fit_per_source] if max_fit_per_source else paths
            for src, paths in parts["held_out"].items():
                held_out.setdefault(src, []).extend(paths)
        logger.info("OOD fit %s: %d fitting images, %d held-out", name, len(fit_paths),
                    sum(map(len, held_out.values())))
        fit_emb, fit_feat, _ = embed_paths(backbone, fit_paths, batch_size, with_features=True)
        held = {src: embed_paths(backbone, p, batch_size, with_features=True) for src, p in held_out.items()}
        for space, fit_x, index in (("embedding", fit_emb, 0), ("features", fit_feat, 1)):
            stats = fit_domain(name if space == "embedding" else f"{name}{FEATURE_SUFFIX}", spec["label_sets"],
                               fit_x, {src: h[index] for src, h in held.items()}, percentile)
            stats.info.update(space=space, data=[Path(d).name for d in spec["data"]],
                              split={"val_fraction": val_fraction, "seed": seed})
            fitted.append(stats)
    if out_dir is not None:
        save_stats(Path(out_dir) / STATS_FILE, fitted, backbone.fingerprint, {"model": backbone.name})
    return fitted


def _parse_domain(spec: str) -> tuple[str, list[str]]:
    """'chest=chestxray14,chest4' -> ("chest", ["chestxray14", "chest4"])."""
    if "=" not in spec:
        raise OODError(f"--domain {spec!r}: expected NAME=LABELSET[,LABELSET...], e.g. chest=chestxray14,chest4")
    name, sets = spec.split("=", 1)
    return name.strip(), [s.strip() for s in sets.split(",") if s.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """python -m vlm.ood fit --model MODEL --domain chest=chestxray14,chest4 --data chest=../shared/data/nih14
    --data chest=../shared/data/chest4 --domain skin=skin12 --data skin=../shared/data/skin --out MODEL_DIR"""
    import argparse

    from .models import load_model

    ap = argparse.ArgumentParser(prog="python -m vlm.ood", description="Fit a model's OOD embedding statistics.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    fit = sub.add_parser("fit", help="fit ood-stats.safetensors from labelled CSVs (patient-split as in training)")
    fit.add_argument("--model", required=True)
    fit.add_argument("--domain", action="append", required=True, help="NAME=LABELSET[,LABELSET...]")
    fit.add_argument("--data", action="append", required=True, help="NAME=labels.csv or folder (repeatable)")
    fit.add_argument("--out", required=True, help="folder to write ood-stats.safetensors into (the model folder)")
    fit.add_argument("--val-fraction", type=float, default=0.15)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    domains = {name: {"label_sets": sets, "data": []} for name, sets in map(_parse_domain, args.domain)}
    for spec in args.data:
        name, _, path = spec.partition("=")
        if name not in domains or not path:
            raise SystemExit(f"--data {spec!r}: expected NAME=PATH with NAME one of {', '.join(domains)}")
        domains[name]["data"].append(path)
    fitted = fit_ood_stats(load_model(args.model), domains, args.out, args.val_fraction, args.seed, args.percentile)
    for d in fitted:
        logger.info("%s: threshold %.2f (%s); held-out false alarms %s", d.name, d.threshold,
                    d.info["threshold_rule"], d.info["held_out_false_alarms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
