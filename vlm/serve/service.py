"""What the API does with a request, independent of HTTP: the loaded model, one ready `Scorer` per
option set, the model thread, and the pipeline upload -> decode -> variant tensors -> (batched)
encoder -> `Scorer.result` -> the `analyze --json` object, plus the OOD verdict and heatmaps.

The model loads once, in `start()` (a background thread, so /healthz answers while it loads);
the served label sets' text embeddings and OOD guards are built before `ready` is set.
"""
from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from .batcher import BatchStats, MicroBatcher
from .config import ServeConfig
from .errors import ApiError
from .uploads import PrivateUploads

logger = logging.getLogger(__name__)

OOD_MODES = ("off", "warn", "reject")


@dataclass(frozen=True)
class PredictOptions:
    labels: str
    threshold: float | None = None
    prompt_styles: tuple[str, ...] | None = None
    variants: tuple[str, ...] | None = None
    heatmaps: bool = False
    heatmap_alpha: float = 0.45
    ood: str = "off"  # the verdict is on request (`ood=warn|reject`), as the API asks

    @property
    def scorer_key(self) -> tuple:
        return self.labels, self.prompt_styles, self.variants


def _csv(value: str | None) -> tuple[str, ...] | None:
    items = tuple(v.strip() for v in (value or "").split(",") if v.strip())
    return items or None


def _unit_float(name: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise ApiError(422, "invalid_request", f"{name} must be a number in [0, 1], got {value[:40]!r}") from None
    if not 0.0 <= x <= 1.0:
        raise ApiError(422, "invalid_request", f"{name} must be in [0, 1], got {x}")
    return x


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise ApiError(422, "invalid_request", f"{name} must be true or false, got {value[:40]!r}")


KNOWN_FIELDS = {"labels", "threshold", "prompt_styles", "variants", "heatmaps", "heatmap_alpha", "ood", "charts", "clinical"}


def parse_options(fields: dict[str, str], default_labels: str) -> PredictOptions:
    """Form fields -> PredictOptions; 422 naming the field for a bad value or an unknown field."""
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown form field(s): {', '.join(unknown)[:200]}; known: "
                                               f"file, {', '.join(sorted(KNOWN_FIELDS))}")
    ood = (fields.get("ood") or "off").strip().lower()
    if ood not in OOD_MODES:
        raise ApiError(422, "invalid_request", f"ood must be one of {', '.join(OOD_MODES)}, got {ood[:40]!r}")
    threshold = fields.get("threshold", "").strip()
    alpha = fields.get("heatmap_alpha", "").strip()
    return PredictOptions(
        labels=(fields.get("labels") or "").strip() or default_labels,
        threshold=_unit_float("threshold", threshold) if threshold else None,
        prompt_styles=_csv(fields.get("prompt_styles")), variants=_csv(fields.get("variants")),
        heatmaps=_flag("heatmaps", fields.get("heatmaps", "")),
        heatmap_alpha=_unit_float("heatmap_alpha", alpha) if alpha else 0.45, ood=ood)


def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name and os.uname().sysname == "Linux" else None


def _mallopt(mmap_threshold: int, trim_threshold: int | None = None) -> None:
    libc = _libc()
    if libc is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    if trim_threshold is not None:
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    if not ok:
        logger.warning("mallopt refused the serve memory settings; RSS may vary with the batch size")


def loading_memory() -> None:
    """While the model loads and embeds the label sets' prompts: big temporary blocks come from mmap
    and go back to the kernel when freed (a fixed 1 MB threshold; glibc's dynamic one would move them
    into the heap after the first large free, where their fragments stay)."""
    _mallopt(1 << 20)


def serving_memory() -> None:
    """From the warm-up on: keep the encoder's working memory resident instead of mapping and
    unmapping it per batch. A batch of 8 requests needs ~50 MB of activations for one forward pass;
    served from mmap, RSS breathes by that much and every batch pays ~10k page faults to zero fresh
    pages (measured: ~25% of the batched server's throughput). With a fixed threshold above the largest
    activation and a high trim threshold, the blocks stay in the model thread's heap: the warm-up runs
    the largest batch first, every later batch reuses that memory, and RSS stays at its working size.
    `malloc_trim` first hands back what loading freed."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    _mallopt(32 << 20, 512 << 20)


def _synthetic_radiographs(size: int) -> list[bytes]:
    """A grey image with two dark ovals on a light field as PNG and as JPEG (the common uploads; each
    decoder has its own per-thread buffers): something every loader and variant accepts."""
    import cv2
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / size
    lungs = (((xx - 0.32) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1) | (((xx - 0.68) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    pixels = np.where(lungs, 70, 190).astype(np.uint8) + (xx * 40).astype(np.uint8)
    encoded = [cv2.imencode(ext, pixels) for ext in (".png", ".jpg")]
    if not all(ok for ok, _ in encoded):
        raise RuntimeError("OpenCV could not encode the warm-up image")
    return [buf.tobytes() for _, buf in encoded]


class ScoringService:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.uploads = PrivateUploads()
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.batcher: MicroBatcher | None = None
        self.backbone = None
        self.base = None  # the scorer built by load_scorer at start-up
        self.label_sets: dict = {}
        self.guards: dict[str, object] = {}  # label set -> OODGuard, or the reason there is none
        self._scorers: OrderedDict[tuple, object] = OrderedDict()
        # CPU work of a request (decode + variants, results, JSON) runs on a few fixed threads: bounded
        # memory (each decoding thread would otherwise grow its own malloc arena) and no oversubscription
        self.workers = ThreadPoolExecutor(max(1, config.decode_workers), thread_name_prefix="vlm-cpu")
        self._loader: threading.Thread | None = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ start-up

    def start(self, background: bool = True) -> None:
        if background:
            self._loader = threading.Thread(target=self._load_safely, name="vlm-load", daemon=True)
            self._loader.start()
        else:
            self._load()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self.ready.wait(timeout)
        if self.load_error:
            raise RuntimeError(self.load_error)
        return self.ready.is_set()

    def _load_safely(self) -> None:
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - reported by /readyz and logged; the process keeps serving health
            self.load_error = f"{type(e).__name__}: {e}"
            logger.error("model failed to load: %s", self.load_error)

    def _load(self) -> None:
        from ..api import load_scorer

        c = self.config
        t0 = time.perf_counter()
        loading_memory()
        self.base = load_scorer(c.model, c.label_sets[0], adapter=c.adapter, calibration=c.calibration,
                                device=c.device, num_workers=0)
        self.base.load_options = replace(self.base.load_options, **({"max_pixels": c.max_pixels} if c.max_pixels else {}))
        self.backbone = self.base.backbone
        self.label_sets[self.base.label_set.name] = self.base.label_set
        self._scorers[PredictOptions(self.base.label_set.name).scorer_key] = self.base
        for name in c.label_sets[1:]:
            scorer = self._build_scorer(PredictOptions(name))  # warms this label set's text embeddings
            self.label_sets[scorer.label_set.name] = scorer.label_set
        for name, label_set in self.label_sets.items():
            self.guards[name] = self._build_guard(label_set)
        serving_memory()
        self.batcher = MicroBatcher(self._encode_batch, c.max_batch, c.max_wait_ms / 1000.0, c.max_queue)
        self._warm_pipeline()
        logger.info("model %s ready in %.1f s (label sets: %s)", self.backbone.name, time.perf_counter() - t0,
                    ", ".join(self.label_sets))
        self.ready.set()

    def _build_guard(self, label_set):
        from ..ood import OODError, OODGuard

        try:
            return OODGuard.for_model(self.backbone, label_set, text_cache=self.base.text_cache)
        except OODError as e:
            return str(e)

    def _warm_pipeline(self) -> None:
        """Run a full batch of requests through the pipeline before /readyz says ready, so memory
        reaches its working size at start-up rather than during the first minutes of load: max_batch
        synthetic uploads (PNG and JPEG: each decoder keeps per-thread buffers) decoded at once on the
        worker threads and held, as under load; the encoder run at every batch size (the CPU kernels
        cache per input shape; the largest batch sets the resident activation memory); every result
        scored and serialised."""
        import json

        uploads = _synthetic_radiographs(max(256, 2 * self.backbone.image_size))
        workers, n = self.config.decode_workers, self.config.max_batch
        gate = threading.Barrier(workers)

        def decode(i: int):
            if i < workers:
                gate.wait(30)  # the first `workers` decodes run one per thread: every thread warms
            return self.decode(uploads[i % len(uploads)], self.base)

        def encode_every_batch_size(tensors: list):
            # largest first: the smaller batches' activations then fit in the memory it freed
            return [self._encode_batch(tensors[:k]) for k in range(n, 0, -1)][0]

        def score(image, embeddings) -> str:
            return json.dumps(self.result(self.base, image, embeddings, "warm-up.png", None).to_dict())

        decoded = list(self.workers.map(decode, range(max(n, workers))))
        # on the model thread, as under load: its malloc arena then holds the activations from the start
        embeddings = self.batcher.call_blocking(lambda: encode_every_batch_size([t for _, _, t in decoded]), 300)
        list(self.workers.map(score, [image for _, image, _ in decoded], embeddings))
        self.batcher.call_blocking(lambda: self._warm_heatmaps(decoded[0][1]), 300)
        self.batcher.stats = BatchStats()  # /readyz and /metrics count requests, not the warm-up

    def _warm_heatmaps(self, image) -> None:
        """One heatmap at start-up: the Grad-CAM stack's first import (pytorch_grad_cam pulls in pandas,
        scipy, sklearn and matplotlib: seconds, with the GIL held in extension initialisers) would
        otherwise stall the event loop, /healthz included, during the first heatmap request, and
        grow RSS then rather than before ready."""
        from ..explain import ExplainError, explain

        try:
            maps = explain(self.base, self.base.label_set, image, labels=self.base.label_set.names[:1])
            maps[0].png(image.pixels, alpha=0.45)
        except ExplainError as e:  # the tower has no heatmap method: requests asking for one are told so
            logger.info("heatmaps unavailable for %s: %s", self.backbone.name, e)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.workers.shutdown(wait=False, cancel_futures=True)
        self.uploads.close()

    # ------------------------------------------------------------------ scorers per option set

    def _build_scorer(self, opts: PredictOptions):
        from ..api import resolve_calibration
        from ..labels import load_label_set
        from ..scoring import Scorer

        base = self.base
        if base.head is not None and opts.labels != base.label_set.name:
            raise ApiError(422, "invalid_request", f"this server's adapter scores label set "
                                                   f"{base.label_set.name!r} only")
        label_set = base.label_set if opts.labels == base.label_set.name else load_label_set(opts.labels)
        styles = list(opts.prompt_styles) if opts.prompt_styles else None
        scorer = Scorer(self.backbone, label_set, styles, list(opts.variants) if opts.variants else None,
                        num_workers=0, text_cache=base.text_cache, head=base.head, adapter_name=base.adapter_name,
                        calibration=resolve_calibration(self.config.calibration, self.backbone, label_set,
                                                        self.config.adapter),
                        load_options=base.load_options)
        self._remember(opts.scorer_key, scorer)
        return scorer

    def _remember(self, key, scorer) -> None:
        self._scorers[key] = scorer
        while len(self._scorers) > max(len(self.label_sets) + 1, self.config.max_scorers):
            oldest = next(k for k in self._scorers if self._scorers[k] is not self.base)
            del self._scorers[oldest]

    async def scorer_for(self, opts: PredictOptions):
        if opts.labels not in self.label_sets:
            raise ApiError(422, "invalid_request", f"label set {opts.labels[:60]!r} is not served here; served: "
                                                   f"{', '.join(self.label_sets)}")
        scorer = self._scorers.get(opts.scorer_key)
        if scorer is not None:
            return scorer
        try:
            return await self.batcher.submit_call(lambda: self._build_scorer(opts))
        except (ValueError, KeyError) as e:  # unknown variant or prompt style: the library names it
            raise ApiError(422, "invalid_request", str(e).strip("'\"")) from None

    # ------------------------------------------------------------------ the pipeline pieces

    def decode(self, data: bytes, scorer):
        """upload bytes -> (kind, Image, variant tensors); at most `decode_workers` at a time."""
        from ..transforms import variant_tensors

        kind, image = self.uploads.decode(data, scorer.load_options)
        b = self.backbone
        return kind, image, variant_tensors(image, scorer.variants, b.image_size, b.mean, b.std)

    async def off_loop(self, fn, *args, **kwargs):
        """Run CPU work on the service's worker threads, not on the event loop."""
        import asyncio
        import functools

        return await asyncio.get_running_loop().run_in_executor(self.workers, functools.partial(fn, *args, **kwargs))

    def _encode_batch(self, tensors: list):
        import torch

        from ..scoring import _autocast

        sizes = [len(t) for t in tensors]
        b = self.backbone
        b.module.eval()
        with torch.no_grad(), _autocast(b.device):
            emb = b.encode_images(torch.cat(tensors).to(b.device)).float().cpu()
        return list(torch.split(emb, sizes))

    def result(self, scorer, image, embeddings, filename: str, threshold):
        from ..images import safe_id
        from ..scoring import EncodedImage

        name = filename or "upload"
        enc = EncodedImage(name, safe_id(name), embeddings, image.view, image.size, image.result_info())
        return scorer.result(enc, threshold)

    def ood_verdict(self, label_set: str, image) -> dict:
        """The guard's full check (embedding and stage features of the 'original' variant)."""
        guard = self.guards.get(label_set)
        if guard is None or isinstance(guard, str):
            return {"available": False, "in_distribution": None, "reason": guard or "no OOD check for this label set"}
        verdict = guard.check_image(image.pixels)
        return {"available": True, **verdict.to_dict()}

    def heatmaps(self, scorer, image, result, alpha: float) -> dict:
        """Overlays (base64 PNG) of the positive findings, on the model thread (they need gradients)."""
        from ..explain import ExplainError, encode_png, explain

        labels = [f.label for f in result.positives]
        if not labels:
            return {"heatmaps": []}
        try:
            maps = explain(scorer, scorer.label_set, image, labels=labels)
        except ExplainError as e:
            return {"heatmaps": [], "heatmaps_unavailable": str(e)}
        b64 = lambda png: base64.b64encode(png).decode("ascii")  # noqa: E731
        items = [{**hm.to_dict(), "png_base64": b64(hm.png(image.pixels, alpha=alpha))} for hm in maps]
        return {"heatmaps": items, "heatmap_base_png_base64": b64(encode_png(maps[0].overlay(image.pixels, alpha=0.0)))}
