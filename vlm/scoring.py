"""The batched scoring engine every command shares.

paths -> (DataLoader workers) load + variants + model transform -> image encoder (batched,
autocast on GPU) -> embeddings (V, D) per image -> logits against ensembled prompt
embeddings per style -> probabilities per (variant, style, label) -> Findings (mean, spread).
"""
from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .fileio import atomic_path
from .images import ImageLoadError, LoadOptions, load_image
from .labels import LabelSet
from .models import Backbone
# the prompt classifier and the image transforms have their own modules; re-exported so that
# `from vlm.scoring import text_classifier, model_transform` keeps working
from .prompt_classifier import TextClassifier, text_classifier  # noqa: F401
from .results import Finding, ImageFailure, ImageResult
from .text_cache import TextEmbeddingCache, default_cache_dir
from .transforms import model_transform, variant_tensors  # noqa: F401
from .variants import resolve_variants


class _VariantDataset(Dataset):
    def __init__(self, paths: list[str], variants: list[str], size: int, mean, std,
                 load_options: LoadOptions | None = None):
        self.paths, self.variants, self.size, self.mean, self.std = paths, variants, size, mean, std
        self.load_options = load_options

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = load_image(path, self.load_options)
            x = variant_tensors(image, self.variants, self.size, self.mean, self.std)
            meta = {"path": path, "id": image.id, "view": image.view, "size": image.size, "info": image.result_info()}
            return meta, x, None
        except ImageLoadError as e:
            return {"path": path}, None, e.reason
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a batch; reason is reported
            return {"path": path}, None, f"{type(e).__name__}: {e}"


def _collate(items):
    return items


def file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ImageEmbeddingCache:
    """Image embeddings keyed by (model fingerprint, file content, variant) on disk, so that
    re-scoring the same images with other prompts costs only text work."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir() / "images"
        self.hits = 0
        self.misses = 0

    def _file(self, fingerprint: str, digest: str) -> Path:
        return self.directory / fingerprint / f"{digest}.npz"

    def get(self, fingerprint: str, digest: str, variants: list[str]) -> np.ndarray | None:
        f = self._file(fingerprint, digest)
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                if all(v in z.files for v in variants):
                    self.hits += 1
                    return np.stack([z[v] for v in variants])
        except (OSError, ValueError):
            return None  # unreadable entry: recomputed and overwritten below
        return None

    def put(self, fingerprint: str, digest: str, variants: list[str], emb: np.ndarray) -> None:
        f = self._file(fingerprint, digest)
        f.parent.mkdir(parents=True, exist_ok=True)
        existing = {}
        if f.is_file():
            try:
                with np.load(f, allow_pickle=False) as z:
                    existing = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                existing = {}
        existing.update({v: e.astype(np.float32) for v, e in zip(variants, emb)})
        with atomic_path(f) as tmp:
            np.savez(tmp, **existing)
        self.misses += 1


@dataclass
class EncodedImage:
    path: str
    id: str
    embeddings: torch.Tensor  # (V, D), L2-normalised
    view: str | None = None
    size: tuple[int, int] | None = None
    info: dict = field(default_factory=dict)  # Image.result_info(): input warnings, laterality, body part


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def default_workers(n_items: int) -> int:
    if n_items < 4:
        return 0  # starting a worker costs more than decoding a couple of images
    return max(1, min(4, (os.cpu_count() or 2) - 1))


@torch.no_grad()
def encode_images(
    backbone: Backbone,
    paths: Iterable[str | Path],
    variants: list[str],
    batch_size: int = 32,
    num_workers: int | None = None,
    cache: ImageEmbeddingCache | None = None,
    progress: bool = False,
    load_options: LoadOptions | None = None,
) -> Iterator[EncodedImage | ImageFailure]:
    """Yield one `EncodedImage` (or `ImageFailure`) per path, in input order.

    Decoding and variants run in DataLoader workers while the model encodes; `batch_size`
    counts images, each contributing len(variants) tensors to the encoder batch.
    """
    paths = [str(p) for p in paths]
    device = backbone.device
    backbone.module.eval()
    todo, cached = [], {}
    if cache is not None:
        for p in paths:
            try:
                digest = file_digest(p)
            except OSError:
                todo.append(p)
                continue
            hit = cache.get(backbone.fingerprint, digest, variants)
            if hit is None:
                todo.append(p)
            else:
                cached[p] = (digest, hit)
    else:
        todo = paths
    computed: dict[str, EncodedImage | ImageFailure] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="images", unit="img", initial=len(paths) - len(todo))
    if todo:
        workers = default_workers(len(todo)) if num_workers is None else num_workers
        loader = DataLoader(
            _VariantDataset(todo, variants, backbone.image_size, backbone.mean, backbone.std, load_options),
            batch_size=max(1, batch_size), num_workers=workers, collate_fn=_collate,
            persistent_workers=False, prefetch_factor=2 if workers else None,
        )
        n_variants = len(variants)
        for items in loader:
            good = [(meta, x) for meta, x, err in items if err is None]
            for meta, _, err in items:
                if err is not None:
                    computed[meta["path"]] = ImageFailure(meta["path"], err)
            if good:
                x = torch.cat([x for _, x in good]).to(device, non_blocking=True)
                with _autocast(device):
                    emb = backbone.encode_images(x).float().cpu()
                emb = emb.view(len(good), n_variants, -1)
                for (meta, _), e in zip(good, emb):
                    computed[meta["path"]] = EncodedImage(meta["path"], meta["id"], e, meta["view"], meta["size"], meta["info"])
                    if cache is not None:
                        try:
                            cache.put(backbone.fingerprint, file_digest(meta["path"]), variants, e.numpy())
                        except OSError as err:
                            import warnings

                            warnings.warn(f"could not write image-embedding cache: {err}")
            if bar is not None:
                bar.update(len(items))
    if bar is not None:
        bar.close()
    for p in paths:
        if p in computed:
            yield computed[p]
        else:
            digest, emb = cached[p]
            from .images import safe_id

            yield EncodedImage(p, safe_id(p), torch.from_numpy(emb))


# ----------------------------------------------------------------------------- embeddings -> findings

def summarise(
    probs: torch.Tensor,
    label_set: LabelSet,
    variants: list[str],
    styles: list[str],
    threshold: float | dict[str, float],
) -> tuple[list[Finding], dict]:
    """probs (V, S, L) -> Findings (mean and std over V x S) and the per-variant breakdown."""
    v, s, n = probs.shape
    flat = probs.reshape(v * s, n).double()
    mean = flat.mean(0)
    std = flat.std(0, unbiased=False) if v * s > 1 else torch.zeros(n, dtype=torch.float64)
    findings = []
    for i, lab in enumerate(label_set.labels):
        thr = threshold[lab.name] if isinstance(threshold, dict) else threshold
        p = float(mean[i])
        findings.append(Finding(label=lab.name, probability=p, uncertainty=float(std[i]), positive=p >= thr,
                                threshold=float(thr), display=lab.display, category=lab.category,
                                severity=lab.severity))
    per_variant = {
        var: {st: {lab.name: round(float(probs[vi, si, li]), 6) for li, lab in enumerate(label_set.labels)}
              for si, st in enumerate(styles)}
        for vi, var in enumerate(variants)
    }
    return findings, per_variant


DEFAULT_THRESHOLD = 0.5


class Scorer:
    """Score images against a label set: the `score` step that analyze, batch, eval,
    prompt experiments and adapters all consume.

    What a scorer is — model, label set, prompt styles, variants, adapter head, calibration —
    is fixed when it is built (`vlm.load_scorer` builds one from names and paths). It owns the
    one threshold rule (`thresholds`).
    """

    def __init__(
        self,
        backbone: Backbone,
        label_set: LabelSet,
        prompt_styles: list[str] | None = None,
        variants: list[str] | str | None = None,
        batch_size: int = 16,
        num_workers: int | None = None,
        text_cache: TextEmbeddingCache | None = None,
        image_cache: ImageEmbeddingCache | None = None,
        head=None,
        adapter_name: str | None = None,
        calibration=None,
        load_options: LoadOptions | None = None,
    ):
        self.backbone = backbone
        # how inputs are read (DICOM window, pixel limit, PHI); the label set's modality lets the loader
        # flag views and body parts that do not fit it
        self.load_options = replace(load_options or LoadOptions(), label_modality=label_set.modality or None)
        self.label_set = label_set
        self.styles = label_set.styles(prompt_styles)
        self.variants = resolve_variants(variants)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.text_cache = text_cache or TextEmbeddingCache()
        self.image_cache = image_cache
        self.classifier = text_classifier(backbone, label_set, self.styles, self.text_cache)
        # An adapter head (few-shot) may replace the prompt classifier; it maps (..., D) to (..., S, L).
        self.head = head
        if head is not None and getattr(head, "styles", None):
            # the head's S axis names its own "styles" (e.g. the prompt styles it was built from,
            # or ["linear-probe"]), so per_variant and prompt_styles in results stay consistent
            self.styles = list(head.styles)
        self.adapter_name = adapter_name
        self.calibration = calibration
        if calibration is not None:
            calibration.check_compatible(self)  # refuses another model's calibration, or one with a head

    def thresholds(self, threshold: float | dict[str, float] | None = None) -> float | dict[str, float]:
        """The one threshold rule: an explicit threshold, else the calibration's per-label
        thresholds, else 0.5."""
        if isinstance(threshold, dict):
            return threshold  # already per-label (resolved by an earlier call)
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {threshold}")
            return float(threshold)
        if self.calibration is not None:
            return dict(self.calibration.thresholds)
        return DEFAULT_THRESHOLD

    def probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        """emb (V, D) -> (V, S, L)."""
        if self.head is not None:
            return self.head(emb)
        if self.calibration is not None:
            return self.calibration.probabilities(self.classifier, emb)
        return self.classifier.probabilities(emb)

    def encode(self, paths: Iterable[str | Path], progress: bool = False):
        return encode_images(self.backbone, paths, self.variants, self.batch_size, self.num_workers,
                             self.image_cache, progress, self.load_options)

    def result(self, enc: EncodedImage, threshold: float | dict[str, float] | None = None) -> ImageResult:
        thr = threshold if isinstance(threshold, dict) else self.thresholds(threshold)
        probs = self.probabilities(enc.embeddings.to(self.backbone.device)).cpu()
        findings, per_variant = summarise(probs, self.label_set, self.variants, self.styles, thr)
        return ImageResult(
            image=enc.path, image_id=enc.id, model=self.backbone.name, label_set=self.label_set.name,
            threshold=None if isinstance(thr, dict) else thr,
            variants=self.variants, prompt_styles=self.styles, findings=findings, per_variant=per_variant,
            view=enc.view, size=enc.size, adapter=self.adapter_name,
            calibration=getattr(self.calibration, "source", None),
            input_warnings=list(enc.info.get("input_warnings", [])),
            extra={k: v for k, v in enc.info.items() if k != "input_warnings"},
        )

    def score(self, paths: Iterable[str | Path], threshold: float | None = None,
              progress: bool = False) -> Iterator[ImageResult | ImageFailure]:
        """One `ImageResult` (or `ImageFailure`) per path, in order; `threshold` as in `thresholds`."""
        thr = self.thresholds(threshold)
        for enc in self.encode(paths, progress=progress):
            yield enc if isinstance(enc, ImageFailure) else self.result(enc, thr)


def score_image(path: str | Path, backbone: Backbone, label_set: LabelSet, threshold: float | None = None,
                **kwargs) -> ImageResult:
    """Convenience: score one image; raises ImageLoadError if it cannot be read."""
    out = next(Scorer(backbone, label_set, **kwargs).score([path], threshold))
    if isinstance(out, ImageFailure):
        raise ImageLoadError(out.image, out.reason)
    return out
