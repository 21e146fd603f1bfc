"""Side by side: `vlm-xray batch` of this checkout against an earlier commit, alternating runs.

    python benchmarks/bench_ab.py --ref 774c017 [--n 400] [--rounds 3] [--variants original,clahe,...]

Each run gets a fresh embedding store, warms the prompts on one image (the everyday case: the label set
was used before) and then scores `--n` images of `--data` with `--calibration none --threshold 0.5`.
The earlier commit runs from a temporary `git worktree` (same interpreter and packages, its own `vlm`
first on PYTHONPATH). The host's speed drifts by tens of percent over minutes here, so the two alternate
and the medians are compared. Writes benchmarks/ab.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def one_run(checkout: Path, list_csv: Path, warm_csv: Path, variants: str, root: Path) -> dict:
    """One timed batch of the `vlm` in `checkout`: run from there, since `python -m` puts the working
    directory first on sys.path, before PYTHONPATH (and the editable install)."""
    env = {**os.environ, "VLM_XRAY_CACHE": str(root / f"cache-{time.monotonic_ns()}"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(checkout)
    cli = [sys.executable, "-m", "vlm.cli", "-q", "batch", "--calibration", "none", "--threshold", "0.5",
           "--variants", variants]
    subprocess.run(cli + [str(warm_csv), "--out", str(root / f"warm-{time.monotonic_ns()}")], env=env,
                   capture_output=True, check=True, cwd=checkout)
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S", *cli, str(list_csv), "--out",
                           str(root / f"out-{time.monotonic_ns()}")], env=env, capture_output=True, text=True,
                          cwd=checkout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"batch failed ({proc.returncode}): {proc.stderr[-2000:]}")
    user, system = proc.stderr.strip().splitlines()[-1].split()
    import_check = subprocess.run([sys.executable, "-c", "import vlm; print(vlm.__file__)"], env=env, cwd=checkout,
                                  capture_output=True, text=True, check=True).stdout.strip()
    if not import_check.startswith(str(checkout)):
        raise SystemExit(f"the run in {checkout} imported {import_check}: not the checkout under test")
    rates = re.findall(r"([\d.]+)img/s", proc.stderr)  # the progress bar's final rate: scoring, start-up excluded
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "scoring_images_per_s": float(rates[-1])}


def write_list(paths: list[Path], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename"])
        w.writerows([str(p)] for p in paths)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="the earlier commit to compare with")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nih14"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="original,clahe,equalize,gamma,hflip")
    ap.add_argument("--out", default=str(HERE / "ab.json"))
    args = ap.parse_args()
    paths = sorted(Path(args.data).glob("*.jpg"))[: args.n + 1]
    with tempfile.TemporaryDirectory(prefix="vlm-ab-") as tmp:
        root = Path(tmp)
        old = root / "ref"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.ref], check=True,
                       capture_output=True)
        try:
            list_csv, warm_csv = write_list(paths[1:], root / "list.csv"), write_list(paths[:1], root / "warm.csv")
            runs: dict[str, list[dict]] = {args.ref: [], "this checkout": []}
            for r in range(args.rounds):
                for name, checkout in ((args.ref, old), ("this checkout", REPO)):
                    got = one_run(checkout, list_csv, warm_csv, args.variants, root)
                    runs[name].append(got)
                    print(f"round {r + 1} {name:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
            shutil.rmtree(old, ignore_errors=True)
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_avg_at_end": os.getloadavg(),
              "n_images": len(paths) - 1, "variants": args.variants, "rounds": args.rounds, "runs": runs,
              "medians": medians}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, m in medians.items():
        print(f"MEDIAN {name:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
