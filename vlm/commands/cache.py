"""`vlm-xray cache info|prune`: the embedding store (see `vlm.store` for what it holds and its eviction rule)."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import click

from .common import UserError, friendly_errors


def parse_size(text: str) -> int:
    """'500MB', '2G', '1.5GiB', '0' -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
             "g": 2**30, "gb": 2**30, "gib": 2**30}
    raw = text.strip().lower()
    number = raw.rstrip("kmgib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        raise UserError(f"size {text!r}: expected a number with an optional unit, such as 500MB or 2GB") from None
    if unit not in units or value < 0:
        raise UserError(f"size {text!r}: expected a number with an optional unit, such as 500MB or 2GB")
    return int(value * units[unit])


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MB"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ts else "-"


@click.group("cache")
def cache():
    """Inspect and prune the embedding store ($VLM_XRAY_CACHE/embeddings.sqlite)."""


@cache.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@friendly_errors
def cache_info(as_json):
    """Where the store is, its size and limit, and entries per model fingerprint."""
    from ..store import open_store

    info = open_store().info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: {_mb(info['file_bytes'])} on disk, vectors {_mb(info['vector_bytes'])} "
               f"of a {_mb(info['max_bytes'])} limit ($VLM_XRAY_CACHE_MAX_MB; least recently used entries go first)")
    for model, m in sorted(info["models"].items()):
        click.echo(f"  model {model}: {m['images']} images ({m['image_vectors']} variant vectors), {m['texts']} texts, "
                   f"{_mb(m['bytes'])}, last used {_when(m['last_used'])}")
    if not info["models"]:
        click.echo("  (empty)")


@cache.command("prune")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Evict least recently used entries until the vectors fit SIZE (e.g. 500MB). "
                   "Default: the store's limit.")
@click.option("--model", "model_fp", default=None, metavar="FINGERPRINT",
              help="Drop every entry of this model fingerprint (see `cache info`).")
@click.option("--all", "everything", is_flag=True, help="Drop everything.")
@friendly_errors
def cache_prune(max_size, model_fp, everything):
    """Make the store smaller; what is removed is recomputed when needed."""
    from ..store import open_store

    if sum(x is not None and x is not False for x in (max_size, model_fp, everything or None)) > 1:
        raise UserError("choose one of --max-size, --model, --all")
    store = open_store()
    before = store.info()["file_bytes"]
    removed = store.prune(parse_size(max_size) if max_size else None, model=model_fp, everything=everything)
    after = store.info()["file_bytes"]
    click.echo(f"removed {removed} entries; {store.path}: {_mb(before)} -> {_mb(after)} on disk")
