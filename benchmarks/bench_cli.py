"""Wall time of one whole single-image `vlm-xray analyze` command (issue 10: "stays under 6 s on this
machine with the new tower"), warm caches: the first run fills the OS file cache and the prompt
embeddings in the store and is not counted.

    python benchmarks/bench_cli.py --repeats 7                   # the bundled starter
    python benchmarks/bench_cli.py --model path/to/other/folder  # the same command on another model

Also splits one run into its phases (imports, model load, scoring, interpreter exit) in a separate
process. Results: benchmarks/cli_latency.json (this model's entry replaced) and a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "nih_00000001_000.png"

PHASES = r"""
import json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as vlm-xray sets it
t0 = time.perf_counter(); marks = []
def mark(name): marks.append((name, time.perf_counter()))
import torch; mark("import torch")
import open_clip; mark("import open_clip (torchvision, transformers)")
from vlm.api import load_scorer; mark("import vlm")
scorer = load_scorer(model=sys.argv[1] or None, device="cpu"); mark("load model + prompts (store)")
list(scorer.score([sys.argv[2]])); mark("score the image")
prev, out = t0, {}
for name, t in marks:
    out[name] = round(t - prev, 3); prev = t
print(json.dumps(out))
"""


def time_command(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model name or folder (default: the bundled starter)")
    ap.add_argument("--image", default=str(EXAMPLE))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(HERE / "cli_latency.json"))
    args = ap.parse_args()
    exe = shutil.which("vlm-xray")
    if exe is None:
        sys.exit("vlm-xray is not on PATH: install the package (pip install -e .) first")
    cmd = [exe, "-q", "analyze", args.image, "--device", "cpu"] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    time_command(cmd, env)  # warm-up: OS file cache, prompt embeddings into the store
    load_before = os.getloadavg()
    walls = [time_command(cmd, env) for _ in range(args.repeats)]
    load_after = os.getloadavg()
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PHASES, args.model, args.image], env=env, capture_output=True,
                          text=True, check=True)
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    phases["interpreter start + exit (rest of the process)"] = round(time.perf_counter() - t - sum(phases.values()), 3)
    entry = {"command": " ".join(["vlm-xray", *cmd[1:]]).replace(str(HERE.parent) + "/", ""),
             "repeats": args.repeats, "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
             "walls_s": [round(w, 3) for w in walls], "load_avg_before": load_before, "load_avg_after": load_after,
             "cpus": os.cpu_count(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
             "phases_of_one_run_s (vlm.api in one process, not the CLI)": phases}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[args.model or "vlm-xray-starter"] = entry
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| model | median s | min s | max s | load avg |\n|---|---|---|---|---|\n"
          f"| {args.model or 'vlm-xray-starter'} | {entry['median_s']:.2f} | {entry['min_s']:.2f} | "
          f"{entry['max_s']:.2f} | {load_before[0]:.2f} -> {load_after[0]:.2f} |")
    for name, s in phases.items():
        print(f"  {name}: {s:.2f} s")


if __name__ == "__main__":
    main()
