"""The Ray engine: the same pipeline on Ray Data, so a batch can use a cluster (`pip install 'vlm-xray[ray]'`).

    paths -> map_batches(_Prepare)   CPU tasks: store lookup by content, else load + variants + model transform
          -> map_batches(_Encoder)   an actor pool of model replicas (GPU when the cluster has them, else CPU)
          -> the driver              scorer.result per image, in input order -> the caller's writer

The driver keeps the `Scorer` (label set, prompt classifier, calibration, adapter head, thresholds), so
findings are computed exactly as by the local engine; replicas only turn pixels into embeddings (and,
with the OOD guard on, its stage features of the 'original' variant, in the same forward pass). Each
replica loads the model itself (by registry name or path, plus the adapter folder) and refuses to run if
its fingerprint differs from the driver's. New embeddings are written to the driver's store.

When a worker dies: Ray Data runs the actor pool with max_restarts=-1 and max_task_retries=-1 (its
defaults for actor pools), so a killed replica is restarted and the batch it was encoding is run again
on a replica; a failed read/preprocess task is retried (max_retries). A batch that died produced no
output, so nothing is duplicated; the driver still checks that every input index arrives exactly once
(a second copy is dropped, a missing one is an error) and yields in input order.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import register_engine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How a replica rebuilds the driver's model: what `load_model` / `load_adapter` were given."""

    model: str
    adapter: str | None
    fingerprint: str
    device: str | None = None  # None: cuda when the replica has a GPU, else cpu

    @classmethod
    def of(cls, scorer) -> "ModelSpec":
        b = scorer.backbone
        from ..models import model_registry

        model = b.name if b.name in model_registry() else (b.source or b.name)
        return cls(model, scorer.adapter_name, b.fingerprint)

    def load(self):
        from ..api import resolve_device
        from ..models import load_model

        # a replica only encodes images: its text tower is never built without an adapter
        backbone = load_model(self.model, device=self.device or resolve_device("auto"), defer_text=not self.adapter)
        if self.adapter:
            from ..adapt import load_adapter

            backbone, _, _ = load_adapter(self.adapter, backbone)
        if backbone.fingerprint != self.fingerprint:
            raise RuntimeError(f"model replica loaded {self.model!r} with fingerprint {backbone.fingerprint}, but the "
                               f"driver's model has {self.fingerprint}; the cluster must see the same model files")
        return backbone


class _Prepare:
    """CPU stage (a Ray task per block): `prepare_image` for each path of a chunk (one input row = the
    `batch_size` paths of one encoder batch, so the replicas see the local engine's batches exactly:
    the same rows in each forward pass, hence the same floating-point results)."""

    def __init__(self, variants, size, load_options, lookup):
        self.args = (variants, size, load_options, lookup)

    def __call__(self, batch: dict) -> dict:
        from ..prepare import prepare_image  # torch-free: a read task does not import torch

        variants, size = self.args[0], self.args[1]
        index = np.concatenate([np.asarray(i, dtype=np.int64) for i in batch["i"]])
        paths = np.array([str(p) for chunk in batch["path"] for p in chunk], dtype=object)
        items = [prepare_image(p, *self.args) for p in paths]
        pixels = np.zeros((len(items), len(variants), 3, size, size), np.uint8)  # normalised by the replica
        for k, it in enumerate(items):
            if it.pixels is not None:
                pixels[k] = it.pixels  # a grey plane (C = 1) fills the three channels
        return {"i": index, "path": paths, "pixels": pixels,
                "fresh": np.array([it.pixels is not None for it in items]),
                "cached": np.array([b"" if it.cached is None else np.asarray(it.cached, np.float32).tobytes()
                                    for it in items], dtype=object),
                "feat": np.array([_bytes(it.cached_features) for it in items], dtype=object),
                "meta": np.array([json.dumps(it.meta) for it in items], dtype=object),
                "digest": np.array([it.digest or "" for it in items], dtype=object),
                "error": np.array([it.error or "" for it in items], dtype=object)}


def _bytes(vec) -> bytes:
    return b"" if vec is None else np.ascontiguousarray(vec, np.float32).tobytes()


class _Encoder:
    """A model replica (a Ray actor): pixels of the fresh rows -> embeddings, all variants in one forward pass
    (and, with `variants` given, the OOD guard's stage features of their 'original' rows in that pass)."""

    def __init__(self, spec: ModelSpec, variants: list[str] | None = None, threads: int | None = None):
        if threads:  # else Ray's own rule: OMP/torch threads = the actor's num_cpus (1 on CPU)
            import torch

            torch.set_num_threads(threads)
        self.backbone = spec.load()
        self.backbone.module.eval()
        self.variants = variants  # None: no stage features wanted

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..scoring import _forward, feature_rows

        fresh = batch["fresh"].astype(bool)
        out, feat = list(batch["cached"]), list(batch["feat"])
        if fresh.any():
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"][fresh]))
            n, v = x.shape[:2]
            rows = feature_rows(n, self.variants) if self.variants else None
            with torch.no_grad():  # grad mode is per thread; Ray calls this from its own threads
                got = _forward(self.backbone, x.view(n * v, *x.shape[2:]), None, rows)
            emb, feats = got if rows is not None else (got, None)
            emb = emb.view(n, v, -1).numpy()
            for j, k in enumerate(np.flatnonzero(fresh)):
                out[k] = _bytes(emb[j])
                feat[k] = _bytes(None if feats is None else feats[j])
        rest = {k: batch[k] for k in ("i", "path", "fresh", "meta", "digest", "error")}
        return {**rest, "emb": np.array(out, dtype=object), "feat": np.array(feat, dtype=object)}


def _init_ray(address: str | None, num_cpus: int | None):
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'vlm-xray[ray]'") from None
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as e:  # e.g. 'auto' with no instance running on this machine
                raise ValueError(f"--ray-address {address}: no Ray cluster answered ({e}). Start one first "
                                 "(`ray start --head` on this machine) or leave --ray-address out to run on "
                                 "a local instance of its own") from None
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


@register_engine("ray")
class RayEngine:
    """address None: a local Ray instance (num_cpus: its CPUs, default all); num_workers: model replicas;
    threads_per_worker: torch threads of a CPU replica (default Ray's: its num_cpus, 1 - the other CPUs
    run the read/preprocess tasks, and more threads than free cores make torch spin, see
    `vlm.scoring.encoder_plan`)."""

    encoder_class = _Encoder  # the replica; a subclass may wrap it (tests kill one mid-batch)

    def __init__(self, address: str | None = None, num_workers: int | None = None, num_cpus: int | None = None,
                 gpus_per_worker: float | None = None, threads_per_worker: int | None = None):
        self.address, self.num_workers, self.num_cpus = address, num_workers, num_cpus
        self.gpus_per_worker = gpus_per_worker
        self.threads_per_worker = threads_per_worker

    def dataset(self, scorer, paths):
        ray = _init_ray(self.address, self.num_cpus)
        import torch

        from ..scoring import encoder_plan, preprocessing_key

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in input order
        b = scorer.backbone
        cache = scorer.image_cache
        lookup = cache.lookup(b.fingerprint, preprocessing_key(b, scorer.load_options)) if cache else None
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        size = max(1, scorer.batch_size)
        chunks = [{"i": list(range(a, min(a + size, len(paths)))), "path": paths[a:a + size]}
                  for a in range(0, len(paths), size)]
        ds = ray.data.from_items(chunks, override_num_blocks=max(1, min(len(chunks), 200)))
        ds = ds.map_batches(_Prepare, fn_constructor_args=(scorer.variants, b.image_size, scorer.load_options, lookup),
                            batch_size=1, concurrency=(1, max(1, int(ray.cluster_resources().get("CPU", 1)))),
                            num_cpus=1)
        features = scorer.variants if scorer.wants_ood_features else None
        args = (ModelSpec.of(scorer), features, self.threads_per_worker)
        # each replica runs as many forward passes at once as the local engine's streams (vlm.scoring.encoder_plan):
        # two on a local instance's CPU, one on a GPU or a cluster (there replicas scale with --num-workers, and a
        # replica holding one CPU must not use two)
        streams = 1 if gpus or self.address else encoder_plan(torch.device("cpu"), 1, batches=len(chunks))[0]
        pool = ray.data.ActorPoolStrategy(size=self.num_workers or 1, max_concurrent_calls_per_actor=streams,
                                          enable_true_multi_threading=streams > 1)
        return ds.map_batches(self.encoder_class, fn_constructor_args=args, batch_size=scorer.batch_size,
                              compute=pool, num_gpus=gpus, num_cpus=0 if gpus else 1)

    def results(self, scorer, paths, threshold) -> Iterator:
        paths = [str(p) for p in paths]
        if not paths:
            return
        thr = scorer.thresholds(threshold)
        pending: dict[int, dict] = {}
        seen: set[int] = set()
        nxt = 0
        new_entries = []
        for row in self.dataset(scorer, paths).iter_rows():
            i = int(row["i"])
            if i in seen:
                logger.warning("ray engine: input %d (%s) arrived twice (a retried batch); the copy is dropped",
                               i, row["path"])
                continue
            seen.add(i)
            pending[i] = row
            while nxt in pending:
                yield self._result(scorer, pending.pop(nxt), thr, new_entries)
                nxt += 1
            self._flush(scorer, new_entries, min_rows=scorer.batch_size)
        self._flush(scorer, new_entries, min_rows=1)
        if nxt != len(paths):
            missing = [paths[k] for k in range(nxt, len(paths)) if k not in seen][:5]
            raise RuntimeError(f"ray engine: {len(paths) - nxt} inputs never came back (first: {missing})")

    @staticmethod
    def _result(scorer, row, thr, new_entries):
        """A row back from the replicas -> ImageResult | ImageFailure (exactly as the local engine)."""
        import torch

        from ..results import ImageFailure
        from ..scoring import PreparedImage, _encoded

        if row["error"]:
            return ImageFailure(row["path"], row["error"])
        meta = json.loads(row["meta"])
        emb = np.frombuffer(row["emb"], np.float32).reshape(len(scorer.variants), -1).copy()
        feats = np.frombuffer(row["feat"], np.float32).copy() if row["feat"] else None
        if row["fresh"] and row["digest"]:
            new_entries.append((row["digest"], meta, emb, feats))
        elif not row["fresh"] and scorer.image_cache is not None:
            scorer.image_cache.hits += 1
        feats = feats if scorer.wants_ood_features else None
        return scorer.outcome(_encoded(PreparedImage(row["path"], meta), torch.from_numpy(emb), feats), thr)

    @staticmethod
    def _flush(scorer, new_entries, min_rows):
        cache = scorer.image_cache
        if cache is None or len(new_entries) < min_rows:
            return
        from ..scoring import FEATURES_VARIANT, preprocessing_key

        b = scorer.backbone
        prep = preprocessing_key(b, scorer.load_options)
        entries = []
        for digest, meta, emb, feats in new_entries:  # stage features (if captured) as one more row
            names, vectors = list(scorer.variants), list(emb)
            if feats is not None:
                names.append(FEATURES_VARIANT)
                vectors.append(feats)
            entries.append((digest, prep, names, vectors, meta))
        cache.store.put_images(b.fingerprint, entries)
        cache.misses += len(new_entries)
        new_entries.clear()
