"""Batch engines: how a list of inputs becomes results, over the same `Scorer` and the same writer.

    local  one process: DataLoader decode workers + one model, streaming (vlm.scoring.encode_images)
    ray    Ray Data: decode/preprocess as CPU map_batches, an actor pool of model replicas

Every engine yields one `ImageResult` or `ImageFailure` per input path, in input order, exactly once;
what is done with them (reports, findings.csv) is the caller's writer (`BackgroundWriter`), so a batch
written by one engine equals a batch written by another. Add an engine with `@register_engine(name)`.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

from .writer import BackgroundWriter, ProcessWriter  # noqa: F401 - part of the package's interface


class Engine(Protocol):
    def results(self, scorer, paths: list, threshold) -> Iterator:
        """One ImageResult | ImageFailure per path, in order; `threshold` as `Scorer.thresholds`."""


_ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str):
    def deco(factory):
        _ENGINES[name] = factory
        return factory

    return deco


def engine_names() -> list[str]:
    _load_builtins()
    return sorted(_ENGINES)


def get_engine(name: str = "local", **options) -> Engine:
    """An engine by name; options are the engine's own (num_workers, compile, address...)."""
    _load_builtins()
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name](**options)


def _load_builtins() -> None:
    from . import local, ray_data  # noqa: F401 - registration side effect; ray itself is imported lazily
