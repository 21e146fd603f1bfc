"""Where a batch loses against the engine alone: steady rates in one process, alternating.

    python benchmarks/bench_gap.py [--data ../shared/data/nih14] [--n 400] [--rounds 3]

Each round runs, on the same images (5 variants, `--calibration none`, OOD guard on, no store):
  engine            the engine alone (`LocalEngine.results`: decode workers, both encoder streams,
                    scoring, OOD verdicts), nothing written
  batch-no-files    `run_batch` with the report files left out (`write_report` a no-op): the writer
                    child still makes each image's findings record
  batch-no-files-inline   the same with that work done inline in the encoder loop's thread
  batch             the whole `run_batch` (report HTML + JSON per image, forked writer)
  batch-inline      the whole `run_batch` with the reports rendered inline in the encoder loop's thread
Rates are images/s from the first result to the last (start-up and the end's index excluded). The
variants replace `vlm.batch` internals (`write_report`, `_writer`) for the measurement only. Writes
benchmarks/gap.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads

HERE = Path(__file__).resolve().parent
FIVE = "original,clahe,equalize,gamma,hflip"
MODES = ("engine", "batch-no-files", "batch-no-files-inline", "batch", "batch-inline")


class _Inline:
    """A writer that does the writer child's work at once, in the calling thread."""

    def __init__(self, done):
        self.done = done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, item, *args):
        import vlm.batch as batch

        self.done(item, batch._report_task(*args) if args else None)


def _timed_engine():
    from vlm.engines.local import LocalEngine

    class Timed(LocalEngine):
        rate = None

        def results(self, scorer, paths, threshold):
            first, n = None, 0
            for n, out in enumerate(super().results(scorer, paths, threshold), 1):
                first = first or time.perf_counter()
                yield out
            self.rate = (n - 1) / (time.perf_counter() - first)

    return Timed()


def run_mode(mode: str, scorer, paths: list[str], out_dir: Path) -> float:
    import vlm.batch as batch

    real_write, real_writer = batch.write_report, batch._writer
    engine = _timed_engine()
    try:
        if "no-files" in mode:
            batch.write_report = lambda *args, **kwargs: None
        if "inline" in mode:
            batch._writer = _Inline
        if mode == "engine":
            for _ in engine.results(scorer, paths, 0.5):
                pass
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            batch.run_batch(scorer, paths, out_dir, 0.5, progress=False, engine=engine)
    finally:
        batch.write_report, batch._writer = real_write, real_writer
    return engine.rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "nih14"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "gap.json"))
    args = ap.parse_args()
    from vlm.api import load_scorer

    paths = sorted(str(p) for p in Path(args.data).iterdir() if p.suffix.lower() in (".jpg", ".png"))[:args.n]
    scorer = load_scorer(variants=FIVE, calibration="none", device="cpu", image_cache=None, ood="warn")
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="vlm-gap-") as tmp:
        for r in range(args.rounds):
            for mode in MODES:
                rates[mode].append(run_mode(mode, scorer, paths, Path(tmp) / "batch"))
            print(f"round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in MODES), flush=True)
    out = {"n_images": len(paths), "variants": FIVE, "rounds": args.rounds,
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg_after": os.getloadavg(),
           "images_per_s": rates, "median_images_per_s": {m: statistics.median(v) for m, v in rates.items()}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| mode | median images/s | share of the engine alone |\n|---|---|---|")
    base = out["median_images_per_s"]["engine"]
    for m, v in out["median_images_per_s"].items():
        print(f"| {m} | {v:.1f} | {v / base:.0%} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
