"""The batched scoring engine every command shares.

paths -> (DataLoader workers) load + variants + model transform -> image encoder (batched,
autocast on GPU) -> embeddings (V, D) per image -> logits against ensembled prompt
embeddings per style -> probabilities per (variant, style, label) -> Findings (mean, spread).
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .images import ImageLoadError, LoadOptions, load_image, safe_id
from .labels import LabelSet
from .models import Backbone
# the prompt classifier and the image transforms have their own modules; re-exported so that
# `from vlm.scoring import text_classifier, model_transform` keeps working
from .prompt_classifier import TextClassifier, text_classifier  # noqa: F401
from .results import Finding, ImageFailure, ImageResult
from .text_cache import TextEmbeddingCache, default_cache_dir
from .transforms import cat_pixels, model_transform, normalise, variant_pixels, variant_tensors  # noqa: F401
from .variants import resolve_variants
# the CPU stage, torch-free (re-exported: callers and tests use these names from here)
from .prepare import (FEATURES_OF, FEATURES_VARIANT, PreparedImage, StoreLookup,  # noqa: F401
                      file_digest, prepare_image)


# ----------------------------------------------------------------------------- paths -> embeddings

# Bump when image loading, a variant or the model transform changes the pixels the encoder sees:
# stored image embeddings of older versions are then not used (and age out of the store).
PREPROCESS_VERSION = 1


def preprocessing_key(backbone: Backbone, load_options: LoadOptions | None = None) -> str:
    """Everything besides model, file content and variant that changes a stored image entry."""
    opts = load_options or LoadOptions()
    spec = {"version": PREPROCESS_VERSION, "size": backbone.image_size, "mean": [round(float(m), 6) for m in backbone.mean],
            "std": [round(float(s), 6) for s in backbone.std], "window": list(opts.window) if opts.window else None,
            "multiframe": opts.multiframe, "include_phi": opts.include_phi, "label_modality": opts.label_modality,
            "max_pixels": opts.max_pixels, "min_side": opts.min_side}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class _VariantDataset(Dataset):
    """Map-style over the whole input list: the DataLoader streams it in order, a few batches ahead."""

    def __init__(self, paths: list[str], variants: list[str], size: int,
                 load_options: LoadOptions | None = None, lookup: StoreLookup | None = None):
        self.paths, self.variants, self.size = paths, variants, size
        self.load_options, self.lookup = load_options, lookup

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> PreparedImage:
        return prepare_image(self.paths[i], self.variants, self.size, self.load_options, self.lookup)


def _collate(items: list[PreparedImage]) -> dict:
    """In the worker: one uint8 (sum V, C, H, W) tensor per batch - one shared-memory transfer, pinnable."""
    tensors = [torch.from_numpy(it.pixels) for it in items if it.pixels is not None]
    for it in items:
        it.pixels = None
    return {"items": items, "pixels": cat_pixels(tensors) if tensors else None}


@contextmanager
def temporary_setting(get, set_, value):
    """`set_(value)` for the block, the value `get()` gave before restored afterwards (thread counts)."""
    before = get()
    set_(value)
    try:
        yield
    finally:
        set_(before)


def _single_threaded_opencv():
    """While decode workers fork: they inherit OpenCV on one thread, as the encoder already has the other
    cores (OpenCV's own pool - two threads on two cores - cost ~0.4 ms more CPU an image and stalled the
    encoder's threads). Set in the parent, because cv2.setNumThreads in a forked child can hang on the
    pool it inherited."""
    import cv2

    return temporary_setting(cv2.getNumThreads, cv2.setNumThreads, 1)


class ImageEmbeddingCache:
    """Image embeddings in the embedding store (`vlm.store`), keyed by (model fingerprint, file
    content, variant, preprocessing), so that re-scoring the same images with other prompts or
    thresholds costs only text work. `hits` / `misses` count images read back / encoded."""

    def __init__(self, directory: str | Path | None = None, max_bytes: int | None = None):
        from .store import open_store, store_path

        self.directory = Path(directory) if directory else default_cache_dir()
        self.max_bytes = max_bytes
        self.store = open_store(self.directory, max_bytes)
        self.location = str(store_path(self.directory))
        self.hits = 0
        self.misses = 0

    def lookup(self, fingerprint: str, prep: str) -> StoreLookup:
        return StoreLookup(self.location, self.max_bytes, fingerprint, prep)

    def get(self, fingerprint: str, digest: str, variants: list[str], prep: str = "-") -> np.ndarray | None:
        hit = self.store.get_image(fingerprint, digest, prep, variants)
        if hit is None:
            return None
        self.hits += 1
        return hit[0]

    def put(self, fingerprint: str, digest: str, variants: list[str], emb: np.ndarray, prep: str = "-",
            meta: dict | None = None) -> None:
        self.store.put_images(fingerprint, [(digest, prep, variants, emb, meta or {})])
        self.misses += 1


@dataclass
class EncodedImage:
    path: str
    id: str
    embeddings: torch.Tensor  # (V, D), L2-normalised
    view: str | None = None
    size: tuple[int, int] | None = None
    info: dict = field(default_factory=dict)  # Image.result_info(): input warnings, laterality, body part
    features: np.ndarray | None = None  # (F,) OOD stage features of the 'original' variant, when captured


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(n_items: int) -> int:
    """Decode workers: every CPU but the one the encoder loop runs on (at most 8), none for a few images."""
    if n_items < 4:
        return 0  # starting a worker costs more than decoding a couple of images
    return max(1, min(8, available_cpus() - 1))


def passive_openmp() -> bool:
    """Whether idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, what `vlm-xray` sets) rather than spin."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def encoder_plan(device: torch.device, workers: int, batches: int = 2, compiled: bool = False
                 ) -> tuple[int, int | None]:
    """(streams, torch threads) for the encoder loop on `device` over `batches` batches beside `workers`
    decode processes.

    CPU: two streams - forward passes of consecutive batches running at once, each on half the threads.
    A small tower's many small ops parallelise poorly inside one pass: on 2 cores one pass on 2 threads
    ran 227 tensors/s where two passes on 1 thread each ran 407 (benchmarks/RESULTS.md, bench (c)). One
    stream on a single CPU, on a GPU (the GPU is the encoder), for a compiled encoder (not re-entrant)
    and for a single batch (an `analyze`: it then runs on torch's threads, as the API does, so the two
    give the same numbers to the last bit; fewer threads round some sums differently).
    Threads: with sleeping OpenMP threads (`passive_openmp`) torch's own setting, split over the
    streams; with spinning ones at most the cores the workers leave (a thread sharing its core with a
    busy worker spins at every barrier: 2 threads + 1 worker ran 4-5x slower than 1 + 1).
    None: leave torch's setting alone."""
    if device.type != "cpu":
        return 1, None
    streams = 1 if compiled or batches < 2 or available_cpus() < 2 else 2
    threads = torch.get_num_threads()
    if workers > 0 and not passive_openmp():
        threads = min(threads, available_cpus() - workers)
    if streams == 1 and threads == torch.get_num_threads():
        return 1, None
    return streams, max(1, threads // streams)


def _encoded(item: PreparedImage, emb: torch.Tensor, features: np.ndarray | None = None) -> EncodedImage:
    meta = item.meta
    size = tuple(meta["size"]) if meta.get("size") else None
    return EncodedImage(item.path, safe_id(item.path), emb, meta.get("view"), size, dict(meta.get("info") or {}),
                        features)


def _loader(backbone: Backbone, paths: list[str], variants: list[str], batch_size: int, num_workers: int | None,
            lookup: StoreLookup | None, load_options: LoadOptions | None) -> DataLoader:
    workers = default_workers(len(paths)) if num_workers is None else num_workers
    dataset = _VariantDataset(paths, variants, backbone.image_size, load_options, lookup)
    return DataLoader(dataset, batch_size=max(1, batch_size), num_workers=workers, collate_fn=_collate,
                      pin_memory=backbone.device.type == "cuda",
                      prefetch_factor=2 if workers else None)


def _forward(backbone: Backbone, pixels: torch.Tensor, encoder, feature_rows=None):
    """All variants of all images of a batch in one forward pass (channels-last + autocast on GPU);
    pixels: uint8 (N, C, H, W) from `variant_pixels`, normalised here, on the model's device.

    feature_rows: batch rows whose OOD stage features are pooled in the same pass; then returns
    (embeddings, features (len(feature_rows), F)), else the embeddings."""
    device = backbone.device
    pixels = normalise(pixels.to(device, non_blocking=True), backbone.mean, backbone.std)
    if device.type == "cuda":
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    if feature_rows is None:
        with _autocast(device):
            return (encoder or backbone.encode_images)(pixels).float().cpu()
    from .ood import StageFeatures

    with StageFeatures(backbone, feature_rows) as sf, _autocast(device):
        emb = (encoder or backbone.encode_images)(pixels).float().cpu()
    return emb, sf.features()


def feature_rows(n_images: int, variants: list[str]) -> list[int] | None:
    """Rows of the 'original' variant in a batch of n_images x variants (None when it is not one)."""
    if FEATURES_OF not in variants:
        return None
    k = list(variants).index(FEATURES_OF)
    return [i * len(variants) + k for i in range(n_images)]


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
    encoder=None,
    features: bool = False,
) -> Iterator[EncodedImage | ImageFailure]:
    """Yield one `EncodedImage` (or `ImageFailure`) per path, in input order, as batches finish.

    One streaming pipeline over the whole list: DataLoader workers (sized to the machine) look each
    file up in the store by content and decode + preprocess the rest, a couple of batches ahead;
    memory holds only those batches. `batch_size` counts images, each contributing len(variants)
    tensors to one forward pass. `encoder` replaces `backbone.encode_images` (e.g. a compiled one).
    features: also capture the OOD guard's stage features of the 'original' variant in that same pass
    (`EncodedImage.features`; kept in the store too), so the guard needs no second decode and forward.
    """
    paths = [str(p) for p in paths]
    backbone.module.eval()
    if backbone.device.type == "cuda":
        backbone.module.to(memory_format=torch.channels_last)
    lookup = cache.lookup(backbone.fingerprint, preprocessing_key(backbone, load_options)) if cache else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="images", unit="img")
    loader = _loader(backbone, paths, variants, batch_size, num_workers, lookup, load_options)
    streams, threads = encoder_plan(backbone.device, loader.num_workers, len(loader), compiled=encoder is not None)
    held = (nullcontext() if threads is None
            else temporary_setting(torch.get_num_threads, torch.set_num_threads, threads))
    with held:
        yield from _encode_batches(backbone, loader, variants, cache, lookup, encoder, features, bar, streams)
    if bar is not None:
        bar.close()


def _encode_batches(backbone, loader, variants, cache, lookup, encoder, features, bar, streams: int = 1):
    """encode_images' loop: one forward pass per batch of the loader (up to `streams` at once), results
    stored and yielded in input order."""
    with _single_threaded_opencv():
        batches = iter(loader)  # forks the workers

    @torch.no_grad()  # grad mode is per thread: the streams' threads need it too
    def embed(batch: dict):
        return _embed_batch(backbone, batch, variants, encoder, features)

    for batch, (fresh, emb, feats) in in_order(batches, embed, streams):
        items: list[PreparedImage] = batch["items"]
        if cache is not None:
            _store_batch(cache, lookup, fresh, emb, variants, items, feats)
        done = iter(range(len(fresh)))
        for it in items:
            if it.error is not None:
                yield ImageFailure(it.path, it.error)
            elif it.cached is not None:
                yield _encoded(it, torch.from_numpy(np.array(it.cached)), it.cached_features if features else None)
            else:
                k = next(done)
                yield _encoded(it, emb[k], None if feats is None else feats[k])
        if bar is not None:
            bar.update(len(items))


def _embed_batch(backbone, batch: dict, variants, encoder, features):
    """(fresh items, embeddings (n, V, D), OOD stage features (n, F)) of one loader batch, by one forward
    pass over the images not failed and not found in the store (None, None without any)."""
    fresh = [it for it in batch["items"] if it.error is None and it.cached is None]
    if not fresh:
        return fresh, None, None
    rows = feature_rows(len(fresh), variants) if features else None
    out = _forward(backbone, batch["pixels"], encoder, rows)
    emb, feats = out if rows is not None else (out, None)
    return fresh, emb.view(len(fresh), len(variants), -1), feats


def in_order(items: Iterator, fn, streams: int = 1) -> Iterator:
    """(item, fn(item)) for each item, in order, with up to `streams` calls of fn running at once on
    threads (one more queued, so no stream waits while this thread handles a finished one)."""
    if streams <= 1:
        for item in items:
            yield item, fn(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(streams, thread_name_prefix="vlm-encoder") as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) > streams:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()


def _store_batch(cache: ImageEmbeddingCache, lookup: StoreLookup, fresh: list[PreparedImage], emb, variants,
                 items: list[PreparedImage], feats: np.ndarray | None = None) -> None:
    """New embeddings (+ OOD stage features) in one transaction; hits marked as used (the store's LRU clock)."""
    hits = [(it.digest, lookup.prep) for it in items if it.cached is not None]
    names = variants if feats is None else [*variants, FEATURES_VARIANT]
    new = [(it.digest, lookup.prep, names, list(e.numpy()) + ([] if feats is None else [feats[k]]), it.meta)
           for k, (it, e) in enumerate(zip(fresh, emb if fresh else [])) if it.digest is not None]
    cache.store.put_images(lookup.fingerprint, new)
    cache.store.touch_images(lookup.fingerprint, hits)
    cache.hits += len(hits)
    cache.misses += len(fresh)


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
    # one .tolist() per array: the same Python floats as float(t[i]), without a tensor index per number
    for lab, p, sd in zip(label_set.labels, mean.tolist(), std.tolist()):
        thr = threshold[lab.name] if isinstance(threshold, dict) else threshold
        findings.append(Finding(label=lab.name, probability=p, uncertainty=sd, positive=p >= thr,
                                threshold=float(thr), display=lab.display, category=lab.category,
                                severity=lab.severity))
    names = [lab.name for lab in label_set.labels]
    per_variant = {
        var: {st: {name: round(x, 6) for name, x in zip(names, row)} for st, row in zip(styles, table)}
        for var, table in zip(variants, probs.tolist())
    }
    return findings, per_variant


DEFAULT_THRESHOLD = 0.5
OOD_MODES = ("warn", "reject", "off")  # warn: verdict in the result; reject: an ImageFailure; off: not checked


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
        ood_guard=None,
        ood_mode: str = "off",
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
        if ood_mode not in OOD_MODES:
            raise ValueError(f"ood mode must be one of {', '.join(OOD_MODES)}, got {ood_mode!r}")
        # out-of-distribution guard (vlm.ood.OODGuard of the base model), or the reason there is none
        self.ood_guard, self.ood_mode = ood_guard, ood_mode

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
                             self.image_cache, progress, self.load_options, features=self.wants_ood_features)

    @property
    def wants_ood_features(self) -> bool:
        """Whether encoding should capture the OOD guard's stage features in the main forward pass."""
        guard = self.ood_guard
        return (self.ood_mode != "off" and not isinstance(guard, str) and guard is not None
                and getattr(guard, "feature_stats", None) is not None and FEATURES_OF in self.variants)

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

    def ood_verdict(self, enc: EncodedImage) -> dict:
        """Is this image what the model and label set were made for? The guard's verdict on the image
        (its 'original' variant, encoded once more with the stage features the guard also checks), and
        a view or body part that does not fit the label set (DICOM header) counts against it too."""
        from .images import fit_warnings

        if isinstance(self.ood_guard, str) or self.ood_guard is None:
            return {"available": False, "in_distribution": None,
                    "reason": self.ood_guard or "the OOD guard is off"}
        verdict = {"available": True, **self._guard_verdict(enc).to_dict()}
        misfit = fit_warnings(enc.view, enc.info.get("body_part"), self.load_options.label_modality)
        if misfit:
            also = f"; {verdict['reason']}" if verdict["in_distribution"] is False else ""
            verdict.update(in_distribution=False, reason="; ".join(misfit) + also)
        return verdict

    def _guard_verdict(self, enc: EncodedImage):
        """From the main pass when it has what the guard needs (the 'original' embedding, and its stage
        features if the guard uses them): no second decode or forward. Else the image is read and
        encoded once more (`OODGuard.check_image`), e.g. when 'original' is not among the variants."""
        guard = self.ood_guard
        if FEATURES_OF in self.variants and (enc.features is not None or getattr(guard, "feature_stats", None) is None):
            return guard.check(enc.embeddings, self.variants, features=enc.features)
        return guard.check_image(load_image(enc.path, self.load_options))

    def outcome(self, enc: EncodedImage, threshold: float | dict[str, float] | None = None
                ) -> ImageResult | ImageFailure:
        """`result` plus the OOD verdict (ood_mode warn/reject); a rejected image is an `ImageFailure`."""
        result = self.result(enc, threshold)
        if self.ood_mode == "off":
            return result
        try:
            result.ood = self.ood_verdict(enc)
        except ImageLoadError as e:  # the file changed or vanished since it was encoded
            return ImageFailure(enc.path, e.reason)
        if self.ood_mode == "reject" and result.ood["in_distribution"] is False:
            return ImageFailure(enc.path, f"rejected as out of distribution (--ood reject): {result.ood['reason']}")
        return result

    def score(self, paths: Iterable[str | Path], threshold: float | None = None,
              progress: bool = False) -> Iterator[ImageResult | ImageFailure]:
        """One `ImageResult` (or `ImageFailure`) per path, in order; `threshold` as in `thresholds`."""
        thr = self.thresholds(threshold)
        for enc in self.encode(paths, progress=progress):
            yield enc if isinstance(enc, ImageFailure) else self.outcome(enc, thr)


def score_image(path: str | Path, backbone: Backbone, label_set: LabelSet, threshold: float | None = None,
                **kwargs) -> ImageResult:
    """Convenience: score one image; raises ImageLoadError if it cannot be read."""
    out = next(Scorer(backbone, label_set, **kwargs).score([path], threshold))
    if isinstance(out, ImageFailure):
        raise ImageLoadError(out.image, out.reason)
    return out
