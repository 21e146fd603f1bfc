"""Performance suite: the batch engine against the naive pipeline and the hardware bounds.

    python benchmarks/bench_perf.py [--data ../shared/data/nih14] [--n 400] [--naive-n 24] [--repeats 1]
                                    [--only a,c,d,e,r,s] [--mem-sizes 1000,10000] [--ray-n 400]
                                    [--rounds 5]

(a) end-to-end `vlm-xray batch` images/s (decode -> variants -> encode -> score -> reports, findings
    written), 1 and 5 variants, whole process (start-up + model load) included, cold embedding store
(b) the naive notebook pipeline on the same images in the same run, alternating with (a): one image at
    a time, each variant its own forward pass, every prompt re-encoded for every image, written against
    the loaded model directly; the same outputs (per-image HTML + JSON report, findings.csv)
(c) encoder-only images/s on pre-decoded tensors - the best of one pass at a time on 1 or 2 threads and
    two passes at once (streams) on 1 thread each - FLOPs per image, share of this machine's measured
    fp32 matmul rate (the practical CPU peak); then, in the same process, the engine alone (Scorer.score:
    decode, encode, score, OOD guard; no store, no reports) as a share of that bound
(d) decode + variants + preprocessing only (the DataLoader stage), images/s
(s) steady end-to-end images/s (first to last report written) as a share of the encoder bound measured
    just before and after, in each of --rounds rounds (the 80 % target); median and range
(r) `vlm-xray batch --engine ray` (local Ray instance) vs the local engine, same list, whole process
(e) peak RSS of `vlm-xray batch` for a 1,000- and a 10,000-entry list (repeated images as hard links,
    store warmed with the distinct images) and of the engine alone (scorer.score streaming)

Each timing is a median over repeats; (a) and (b) alternate so machine noise hits both alike. Results
go to benchmarks/perf.json and the tables are printed; benchmarks/RESULTS.md quotes them.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAIVE = HERE / "naive_pipeline.py"
FIVE = "original,clahe,equalize,gamma,hflip"


def images(data: Path, n: int) -> list[Path]:
    return sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:n]


def run(cmd: list[str], env: dict) -> dict:
    """Wall seconds, CPU seconds (user + sys, children included) and peak RSS (MB) of one command.

    CPU seconds are what a side-by-side ratio should use on a machine shared with other jobs: wall time
    there mostly measures the neighbours."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr[-1500:]}")
    user, system, rss_kb = proc.stderr.strip().splitlines()[-1].split()
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_mb": int(rss_kb) / 1024}


def fresh_env(root: Path, tag: str) -> dict:
    env = {**os.environ, "VLM_XRAY_CACHE": str(root / f"cache-{tag}-{time.monotonic_ns()}"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return env


def write_list(paths: list[Path], csv_path: Path) -> Path:
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename"])
        for p in paths:
            w.writerow([os.path.relpath(p, csv_path.parent)])
    return csv_path


def bench_end_to_end(paths, naive_n, repeats, root: Path) -> dict:
    """(a) + (b): the engine on all `paths` (1 and 5 variants, and a re-run with a new threshold on the
    same store), and engine vs naive side by side on the first `naive_n` (the naive one is slow)."""
    small = write_list(paths[:naive_n], root / "small.csv")
    full = write_list(paths, root / "full.csv")
    prompt_warmer = write_list(paths[-1:], root / "warmer.csv")  # not among the small list's images
    cli = [sys.executable, "-m", "vlm.cli", "-q", "batch", "--calibration", "none", "--threshold", "0.5"]
    runs: dict[str, list[dict]] = {}
    for r in range(repeats):
        def add(name, cmd, env):
            runs.setdefault(name, []).append(run(cmd, env))

        add("naive_5v_small", [sys.executable, str(NAIVE), str(small), "--variants", FIVE,
                               "--out", str(root / f"naive-{r}")], fresh_env(root, "n"))
        add("engine_5v_small", cli + [str(small), "--variants", FIVE, "--out", str(root / f"es-{r}")],
            fresh_env(root, "es"))
        # the everyday case: prompts already in the store (any earlier run with this label set), new images
        warm = fresh_env(root, "ew")
        run(cli + [str(prompt_warmer), "--variants", FIVE, "--out", str(root / f"ew-warm-{r}")], warm)
        add("engine_5v_small_warm_prompts", cli + [str(small), "--variants", FIVE, "--out", str(root / f"ew-{r}")],
            warm)
        add("engine_1v", cli + [str(full), "--variants", "original", "--out", str(root / f"e1-{r}")],
            fresh_env(root, "e1"))
        env = fresh_env(root, "e5")
        add("engine_5v", cli + [str(full), "--variants", FIVE, "--out", str(root / f"e5-{r}")], env)
        rerun = [a if a != "0.5" else "0.4" for a in cli]  # same store, new threshold: text work only (cached)
        add("engine_5v_rerun_new_threshold", rerun + [str(full), "--variants", FIVE, "--out", str(root / f"e5b-{r}")],
            env)
    out: dict = {"n_images": len(paths), "n_images_naive": naive_n, "repeats": repeats}
    for name, rs in runs.items():
        n = naive_n if "_small" in name else len(paths)
        med = {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        out[name] = {**med, "images_per_wall_s": n / med["wall_s"], "images_per_cpu_s": n / med["cpu_s"]}
    out["speedup_5v_whole_process_cpu"] = out["naive_5v_small"]["cpu_s"] / out["engine_5v_small"]["cpu_s"]
    out["speedup_5v_whole_process_wall"] = out["naive_5v_small"]["wall_s"] / out["engine_5v_small"]["wall_s"]
    warm = out["engine_5v_small_warm_prompts"]
    out["speedup_5v_whole_process_wall_warm_prompts"] = out["naive_5v_small"]["wall_s"] / warm["wall_s"]
    out["speedup_5v_whole_process_cpu_warm_prompts"] = out["naive_5v_small"]["cpu_s"] / warm["cpu_s"]
    # per-image (marginal) cost: the engine's start-up (interpreter, torch, model, prompts) taken out
    extra = max(1, len(paths) - naive_n)
    per_engine = (out["engine_5v"]["cpu_s"] - out["engine_5v_small"]["cpu_s"]) / extra
    per_engine_wall = (out["engine_5v"]["wall_s"] - out["engine_5v_small"]["wall_s"]) / extra
    startup = out["engine_5v_small"]["cpu_s"] - naive_n * per_engine
    per_naive = (out["naive_5v_small"]["cpu_s"] - startup) / naive_n
    out["per_image_cpu_s"] = {"engine_5v": per_engine, "naive_5v": per_naive, "startup": startup,
                              "speedup_per_image": per_naive / per_engine if per_engine > 0 else None}
    out["steady_images_per_wall_s_5v"] = 1 / per_engine_wall if per_engine_wall > 0 else None
    out["projected_whole_process_cpu_ratio"] = projected_ratios(per_naive, per_engine, startup,
                                                                out["naive_5v_small"]["cpu_s"] - naive_n * per_naive)
    return out


def projected_ratios(per_naive: float, per_engine: float, startup: float, naive_startup: float,
                     sizes=(100, 1000, 10000)) -> dict:
    """Whole-process CPU ratio naive / engine at longer lists, from the measured per-image and start-up
    costs (a projection, labelled as such: a naive run of 1,000 images would take most of an hour)."""
    return {str(n): (naive_startup + n * per_naive) / (startup + n * per_engine) for n in sizes}


def bench_ray(paths, repeats, root: Path, variants: str = FIVE) -> dict:
    """Ray engine on a local Ray instance vs the local engine: the same list, whole process, cold store,
    alternating; findings.csv must be byte-identical."""
    lst = write_list(paths, root / "ray.csv")
    cli = [sys.executable, "-m", "vlm.cli", "-q", "batch", str(lst), "--calibration", "none", "--threshold", "0.5",
           "--variants", variants]
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for r in range(repeats):
        for engine in ("local", "ray"):
            runs[engine].append(run(cli + ["--engine", engine, "--out", str(root / f"{engine}-{r}")],
                                    fresh_env(root, engine)))
        same = (root / f"local-{r}" / "findings.csv").read_bytes() == (root / f"ray-{r}" / "findings.csv").read_bytes()
        if not same:
            raise RuntimeError("ray and local findings.csv differ")
    out: dict = {"n_images": len(paths), "variants": variants, "repeats": repeats, "findings_identical": True,
                 "note": "CPU seconds of the Ray run exclude Ray's worker processes (not children of the driver)"}
    for engine, rs in runs.items():
        out[engine] = {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    out["ray_speed_vs_local_wall"] = out["local"]["wall_s"] / out["ray"]["wall_s"]
    return out


ENCODER_CONFIGS = ((1, 1), (1, 2), (2, 1))  # (streams, torch threads each): every way to use 2 cores


def _encoder_rate(encode, x, n_images: int, streams: int, repeats: int) -> tuple[float, float]:
    """(images/s, CPU s an image) of `encode(x)` with `streams` threads running passes at once."""
    import threading

    import torch

    rounds = max(5, repeats + 4)

    def loop() -> None:
        with torch.inference_mode():  # grad mode is per thread
            for _ in range(rounds):
                encode(x)

    with torch.inference_mode():
        for _ in range(2):
            encode(x)  # warm-up (first calls of a shape are slow)
    t, c = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=loop) for _ in range(streams)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall, cpu, done = time.perf_counter() - t, time.process_time() - c, rounds * streams * n_images
    return done / wall, cpu / done


def bench_encoder(paths, repeats, images_per_batch=16) -> dict:
    """(c) encoder-only on pre-decoded tensors, at the engine's batch shape (16 images x variants per
    forward pass, the CLI default), run every way two cores can run it: one pass at a time on 1 or 2
    threads, and two passes at once on 1 thread each (what the engine does on a CPU). The bound is the
    best of them. FLOPs, matmul rate."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlm.images import load_image
    from vlm.models import load_model
    from vlm.transforms import variant_tensors

    b = load_model("vlm-xray-starter", device="cpu")
    b.module.eval()
    default_threads = torch.get_num_threads()
    out: dict = {"images_per_batch": images_per_batch, "configs": {}}
    for tag, variants in (("1v", ["original"]), ("5v", FIVE.split(","))):
        x = torch.cat([variant_tensors(load_image(p), variants, b.image_size, b.mean, b.std)
                       for p in paths[:images_per_batch]])
        for streams, threads in ENCODER_CONFIGS:
            if streams * threads > max(2, default_threads):
                continue
            torch.set_num_threads(threads)
            rate, cpu = _encoder_rate(b.encode_images, x, len(x) // len(variants), streams, repeats)
            got = out["configs"].setdefault(f"{streams}x{threads}", {})
            got.update({f"images_per_s_{tag}": rate, f"cpu_s_per_image_{tag}": cpu,
                        f"tensors_per_s_{tag}": rate * len(variants)})
    torch.set_num_threads(default_threads)
    for key in ("images_per_s_1v", "images_per_s_5v", "tensors_per_s_5v"):
        best = max(out["configs"], key=lambda k: out["configs"][k][key])
        out[key], out[f"{key}_config"] = out["configs"][best][key], best
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        b.encode_images(x[:1])
    flops = fc.get_total_flops()
    a = torch.randn(1024, 1024)
    mm = []
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        mm.append(time.perf_counter() - t)
    matmul = 2 * 1024**3 / statistics.median(mm)
    rate = flops * out["tensors_per_s_5v"]
    out.update(flops_per_tensor=flops, encoder_flop_rate_5v=rate, matmul_flop_rate=matmul,
               share_of_matmul_rate_5v=rate / matmul)
    # where the batch's gap to the bound is: the engine alone, right after the bound in the same process
    stream = [_engine_stream_rate(paths) for _ in range(max(1, repeats))]
    out["engine_stream_images_per_s_5v"] = statistics.median(stream)
    out["engine_stream_share_of_bound_5v"] = out["engine_stream_images_per_s_5v"] / out["images_per_s_5v"]
    return out


def _engine_stream_rate(paths) -> float:
    """Images/s of the engine alone (`Scorer.score`: decode workers, both encoder streams, scoring and the
    OOD guard; no store, no reports), from its first result to its last: the batch minus its writing."""
    from vlm.api import load_scorer

    scorer = load_scorer(variants=FIVE, calibration="none", device="cpu", image_cache=None, ood="warn")
    first = None
    for n, _ in enumerate(scorer.score([str(p) for p in paths]), 1):
        first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def bench_share(paths, rounds: int, root: Path, seconds: float = 4.0) -> dict:
    """(s) the share of the encoder bound, side by side: each round measures the bound as (c) does (two
    passes at once on 1 thread each, 16 images x 5 variants) for ~`seconds`, runs `vlm-xray batch` on
    `paths` (cold store, 5 variants, reports written), then measures the bound again. The batch's steady
    rate comes from its own output: reports written / the time between the first and the last report
    file (start-up and the end's index excluded); its share = that / the mean of the two bounds around it.
    Between the bounds also the batch with --no-html-reports (each image's JSON only); after them the
    engine alone on the same paths (`_engine_stream_rate`: no store, no reports), against the same bounds.
    The host's speed drifts by tens of percent within minutes, hence bounds on both sides, and rounds."""
    import torch

    from vlm.images import load_image
    from vlm.models import load_model
    from vlm.transforms import variant_tensors

    b = load_model("vlm-xray-starter", device="cpu")
    b.module.eval()
    x = torch.cat([variant_tensors(load_image(p), FIVE.split(","), b.image_size, b.mean, b.std) for p in paths[:16]])
    full = write_list(paths, root / "share.csv")
    cli = [sys.executable, "-m", "vlm.cli", "-q", "batch", "--calibration", "none", "--threshold", "0.5",
           "--variants", FIVE]
    threads = torch.get_num_threads()

    def bound() -> float:
        torch.set_num_threads(1)
        rate = _encoder_rate(b.encode_images, x, 16, 2, 1)[0]
        passes = max(1, round(seconds * rate / 32))  # (two streams x 16 images a pass)
        rate = _encoder_rate(b.encode_images, x, 16, 2, passes - 4)[0]
        torch.set_num_threads(threads)
        return rate

    out: dict = {"n_images": len(paths), "rounds": []}
    def steady(folder: Path) -> float:
        written = sorted(p.stat().st_mtime for p in (folder / "reports").glob("*.json"))
        return (len(written) - 1) / (written[-1] - written[0])

    for r in range(rounds):
        before = bound()
        wall = run(cli + [str(full), "--out", str(root / f"share-{r}")], fresh_env(root, "s"))["wall_s"]
        run(cli + [str(full), "--no-html-reports", "--out", str(root / f"share-json-{r}")], fresh_env(root, "sj"))
        after = bound()
        engine = _engine_stream_rate(paths)  # the same pipeline without writing anything
        mean = (before + after) / 2
        batch, json_only = steady(root / f"share-{r}"), steady(root / f"share-json-{r}")
        out["rounds"].append({"bound_before": before, "bound_after": after, "steady_images_per_s": batch,
                              "whole_process_wall_s": wall, "share": batch / mean,
                              "no_html_images_per_s": json_only, "no_html_share": json_only / mean,
                              "engine_alone_images_per_s": engine, "engine_alone_share": engine / mean})
        print(f"  round {r + 1}: bound {before:.1f} / {after:.1f}, batch steady {batch:.1f} images/s: "
              f"{batch / mean:.0%}; --no-html-reports {json_only:.1f}: {json_only / mean:.0%}; "
              f"engine alone {engine:.1f}: {engine / mean:.0%}", flush=True)
    for key in ("share", "no_html_share", "engine_alone_share"):
        got = [x[key] for x in out["rounds"]]
        out.update({f"{key}_median": statistics.median(got), f"{key}_min": min(got), f"{key}_max": max(got)})
    return out


def bench_decode(paths, repeats) -> dict:
    """(d) the CPU stage alone, through the same DataLoader workers the engine uses."""
    from vlm.models import load_model
    from vlm.scoring import _loader

    b = load_model("vlm-xray-starter", device="cpu")
    out = {}
    for tag, variants in (("1v", ["original"]), ("5v", FIVE.split(","))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _batch in _loader(b, [str(p) for p in paths], variants, 16, None, None, None):
                pass
            times.append(time.perf_counter() - t)
        out[f"images_per_s_{tag}"] = len(paths) / statistics.median(times)
    from vlm.scoring import default_workers

    out["workers"] = default_workers(len(paths))
    return out


def bench_memory(paths, root: Path, sizes=(1000, 10000), stream: bool = False) -> dict:
    """(e) peak RSS of `vlm-xray batch` (defaults: OOD guard on, reports, index) at 1k and 10k inputs.

    The inputs are hard links of the sample images (distinct paths and report names, same content) and
    the store is warmed first with the distinct images, so every entry is a store hit by content: the
    run measures what grows with the list - per-image reports, the index, findings, the batch's own
    bookkeeping - without 10k encoder passes (which hold only the batches in flight anyway). stream:
    also the engine alone streaming the same list (scorer.score, nothing kept)."""
    links = root / "links"
    links.mkdir(exist_ok=True)
    env = fresh_env(root, "mem")
    cli = [sys.executable, "-m", "vlm.cli", "-q", "batch", "--variants", "original", "--calibration", "none"]
    warm = run(cli + [str(write_list(paths, root / "warm.csv")), "--out", str(root / "mem-warm")], env)
    out: dict = {"variants": "original", "distinct_images": len(paths), "warm_up": warm,
                 "rss_note": "peak RSS of the batch process itself (getrusage max of the largest process; "
                             "DataLoader workers are separate processes, not summed)"}
    for n in sizes:
        entries = []
        for k in range(n):
            src = paths[k % len(paths)]
            dst = links / f"{k:05d}{src.suffix}"
            if not dst.exists():
                os.link(src, dst)
            entries.append(dst)
        lst = write_list(entries, root / f"list{n}.csv")
        batched = run(cli + [str(lst), "--out", str(root / f"mem{n}")], env)
        reports = sum(1 for _ in (root / f"mem{n}" / "reports").glob("*.json"))
        if reports != n:
            raise RuntimeError(f"(e): {n} inputs but {reports} reports")
        out[str(n)] = {"batch_peak_rss_mb": batched["peak_rss_mb"], "batch_cpu_s": batched["cpu_s"],
                       "batch_wall_s": batched["wall_s"], "reports": reports}
        if stream:
            streamed = run([sys.executable, str(HERE / "bench_perf.py"), "--stream-rss", str(lst)], env)
            out[str(n)].update(engine_stream_peak_rss_mb=streamed["peak_rss_mb"], engine_stream_cpu_s=streamed["cpu_s"])
        shutil.rmtree(root / f"mem{n}")
    lo, hi = (str(n) for n in (min(sizes), max(sizes)))
    out["batch_ratio_10k_1k"] = out[hi]["batch_peak_rss_mb"] / out[lo]["batch_peak_rss_mb"]
    if stream:
        out["engine_ratio_10k_1k"] = out[hi]["engine_stream_peak_rss_mb"] / out[lo]["engine_stream_peak_rss_mb"]
    return out


def stream_rss(list_csv: str) -> None:
    """Child of (e): stream every entry through the engine, keep nothing."""
    from vlm.api import load_scorer
    from vlm.batch import collect_inputs
    from vlm.scoring import ImageEmbeddingCache

    scorer = load_scorer(variants="original", calibration="none", device="cpu", image_cache=ImageEmbeddingCache(),
                         ood="warn")
    n = sum(1 for _ in scorer.score(collect_inputs([list_csv])))
    print(n)


def model_identity() -> dict:
    """Which bundled model the numbers are for (it gets replaced between sessions)."""
    from vlm.models import load_model

    b = load_model("vlm-xray-starter", device="cpu")
    visual = getattr(b.module, "visual", None)
    tower = getattr(getattr(visual, "trunk", None), "default_cfg", {}).get("architecture")
    return {"name": b.name, "fingerprint": b.fingerprint, "image_size": b.image_size, "tower": tower}


def shares(e2e: dict, enc: dict, dec: dict | None) -> dict:
    """End-to-end images/s as a share of the encoder-only bound (wall clock, same machine, minutes apart),
    and of the pipeline bound: the slower of the encoder alone and the decode stage alone, each with the
    machine to itself (the engine runs both at once, so it cannot beat either)."""
    n = e2e["n_images"]
    out = {"whole_process_5v": n / e2e["engine_5v"]["wall_s"] / enc["images_per_s_5v"],
           "whole_process_1v": n / e2e["engine_1v"]["wall_s"] / enc["images_per_s_1v"]}
    steady = e2e.get("steady_images_per_wall_s_5v")
    if steady:
        out["steady_5v_startup_excluded"] = steady / enc["images_per_s_5v"]
    if dec:
        bound = min(enc["images_per_s_5v"], dec["images_per_s_5v"])
        out["pipeline_bound_5v_images_per_s"] = bound
        if steady:
            out["steady_5v_share_of_pipeline_bound"] = steady / bound
    return out


def table(results: dict) -> str:
    lines = ["| measurement | value |", "|---|---|"]

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif not isinstance(v, list):
                lines.append(f"| {prefix}{k} | {v:.4g} |" if isinstance(v, float) else f"| {prefix}{k} | {v} |")

    walk("", results)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "nih14"))
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--naive-n", type=int, default=6)
    ap.add_argument("--mem-sizes", default="1000,10000", help="(e): list sizes")
    ap.add_argument("--mem-stream", action="store_true", help="(e): also the engine alone, streaming")
    ap.add_argument("--ray-n", type=int, default=200, help="(r): images for Ray vs local")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="(s): rounds of bound, batch, bound")
    ap.add_argument("--only", default="a,c,d,e,r")
    ap.add_argument("--out", default=str(HERE / "perf.json"))
    ap.add_argument("--stream-rss", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_rss:
        return stream_rss(args.stream_rss)
    paths = images(Path(args.data), args.n)
    only = set(args.only.split(","))
    out_file = Path(args.out)
    results = json.loads(out_file.read_text()) if out_file.is_file() else {}
    results.pop("end_to_end_share_of_encoder_bound_5v_cpu", None)  # an earlier version's key
    results["machine"] = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "gpu": "none in this session",
                          "model": model_identity(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        root = Path(tmp)
        steps = {"a": ("end_to_end", lambda: bench_end_to_end(paths, args.naive_n, args.repeats, root)),
                 "c": ("encoder", lambda: bench_encoder(paths, args.repeats)),
                 "d": ("decode", lambda: bench_decode(paths, args.repeats)),
                 "e": ("memory", lambda: bench_memory(paths, root, tuple(map(int, args.mem_sizes.split(","))), args.mem_stream)),
                 "r": ("ray", lambda: bench_ray(images(Path(args.data), args.ray_n), args.repeats, root)),
                 "s": ("share_of_bound", lambda: bench_share(paths, args.rounds, root))}
        for key in "acders":
            if key in only:
                name, fn = steps[key]
                t = time.perf_counter()
                load_before = os.getloadavg()
                results[name] = fn()
                results[name]["load_avg_before_after"] = [load_before, os.getloadavg()]
                print(f"## {name} ({time.perf_counter() - t:.0f} s)\n{table(results[name])}\n", flush=True)
                out_file.write_text(json.dumps(results, indent=2) + "\n")
    if "end_to_end" in results and "encoder" in results:
        results["shares_of_encoder_bound"] = shares(results["end_to_end"], results["encoder"], results.get("decode"))
        out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
