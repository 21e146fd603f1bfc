"""Bounded load against `vlm-xray serve` on loopback: micro-batched vs unbatched in the same run.

    python benchmarks/bench_serve.py [--requests 500] [--clients 8] [--malformed 0.1] [--batch 8] [--model NAME]

Two server processes run side by side on free 127.0.0.1 ports with the bundled model (or --model):
the same server code, micro-batched (--max-batch 8) and unbatched (--max-batch 1). The script
measures each one's single-request latency (idle, sequential, median of 8), then sends the same
--requests POST /v1/predict to each from --clients concurrent clients, in --rounds alternating rounds
(so drifting load from other jobs on a shared machine hits both modes alike), --malformed of them
hostile (text, truncated PNG, a 16-px image, a bad option). The load generator is light (keep-alive
http.client connections posting pre-built bodies): it shares the server's cores. It records
throughput, p50/p95/p99 latency, status counts, whether every body is JSON with the expected keys,
CPU seconds per request of each server and of the load generator, and each server's RSS when ready,
at the start of the load, its peak (sampled every 0.25 s) and at the end. Then, on the batched
server, it sends heatmap requests from 4 clients while timing GET /healthz every 50 ms from a
separate process. Writes benchmarks/serve.md and benchmarks/serve.json, with the issue's targets
marked met or not. Loopback only; nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data" / "nih14"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def good_images(n: int = 24) -> list[tuple[str, bytes]]:
    files = sorted(SHARED.glob("*.jpg"))[:n] if SHARED.is_dir() else []
    files = files or sorted((REPO / "examples").glob("*.png"))
    return [(f.name, f.read_bytes()) for f in files]


def malformed_requests() -> list[tuple[str, bytes, dict]]:
    small = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(small, format="PNG")
    png = good_images(1)[0][1]
    return [("notes.txt", b"patient notes, not an image\n" * 50, {}),
            ("cut.png", b"\x89PNG\r\n\x1a\n" + png[8:200], {}),
            ("tiny.png", small.getvalue(), {}),
            ("bad-option.png", png, {"threshold": "7"})]


class Server:
    def __init__(self, max_batch: int, model: str | None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "vlm.cli", "-q", "serve", "--port", str(self.port), "--max-batch", str(max_batch),
               "--max-queue", "64"]
        if model:
            cmd += ["--model", model]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        self.samples: list[float] = []
        self._stop = threading.Event()

    def wait_ready(self, timeout: float = 300) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def sample_memory(self):
        def loop():
            while not self._stop.is_set():
                self.samples.append(rss_mb(self.proc.pid))
                time.sleep(0.25)
        self._stop.clear()
        self.samples = []
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def stop_sampling(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def multipart(name: str, data: bytes, fields: dict) -> tuple[bytes, str]:
    """The request body and its Content-Type, built once per distinct request of the plan."""
    boundary = "vlmbench" + "0" * 16
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class LightClient:
    """One keep-alive HTTP/1.1 connection (http.client) posting pre-built bodies: the load generator
    shares the server's two cores, so it should spend as little CPU per request as it can."""

    def __init__(self, url: str):
        self.host, self.port = url.removeprefix("http://").split(":")
        self.conn: http.client.HTTPConnection | None = None
        self._bodies: dict[tuple, tuple[bytes, str]] = {}

    def post(self, name: str, data: bytes, fields: dict) -> tuple[int, bytes]:
        key = (name, id(data), tuple(sorted(fields.items())))
        if key not in self._bodies:
            self._bodies[key] = multipart(name, data, fields)
        body, ctype = self._bodies[key]
        for attempt in (0, 1):  # one reconnect: the server may close an idle keep-alive connection
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=300)
            try:
                self.conn.request("POST", "/v1/predict", body, {"Content-Type": ctype})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


def post(client: LightClient, name: str, data: bytes, fields: dict) -> tuple[int, float, bool]:
    t = time.perf_counter()
    status, raw = client.post(name, data, fields)
    dt = time.perf_counter() - t
    try:
        body = json.loads(raw)
        ok = ("findings" in body) if status == 200 else (set(body) == {"error", "detail"})
    except ValueError:
        ok = False
    return status, dt, ok


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def make_plan(n: int, malformed: float, seed: int = 0) -> list[tuple[bool, tuple]]:
    rng = random.Random(seed)
    goods, bads = good_images(), malformed_requests()
    return [(True, goods[i % len(goods)]) if rng.random() >= malformed else (False, rng.choice(bads)) for i in range(n)]


def single_latency(server: Server) -> float:
    goods = good_images()
    c = LightClient(server.url)  # idle server: one request at a time
    for name, data in goods[:2]:
        post(c, name, data, {})
    return statistics.median(post(c, *goods[i % len(goods)], {})[1] for i in range(8))


def send(server: Server, plan: list, clients: int) -> tuple[list, float]:
    """POST every planned request from `clients` concurrent clients; (results, wall seconds)."""
    results: list[tuple[bool, int, float, bool]] = []
    lock = threading.Lock()
    local = threading.local()

    def one(item):
        good, spec = item
        if not hasattr(local, "client"):
            local.client = LightClient(server.url)
        fields = spec[2] if not good else {}
        status, dt, ok = post(local.client, spec[0], spec[1], fields)
        with lock:
            results.append((good, status, dt, ok))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, plan))
    return results, time.perf_counter() - t0


def summarise(server: Server, plan: list, results: list, wall: float, clients: int, single: float,
              rss: tuple[float, float, float], cpu: dict) -> dict:
    stats = httpx.get(server.url + "/readyz").json()["batches"]
    good_lat = [dt for good, st, dt, ok in results if good and st == 200]
    statuses: dict[str, int] = {}
    for _g, st, _dt, _ok in results:
        statuses[str(st)] = statuses.get(str(st), 0) + 1
    return {
        "requests": len(plan), "clients": clients, "malformed_sent": sum(1 for g, _ in plan if not g),
        "wall_s": round(wall, 2), "throughput_rps": round(len(good_lat) / wall, 3),
        "single_request_s": round(single, 3),
        "p50_s": round(pct(good_lat, 50), 3), "p95_s": round(pct(good_lat, 95), 3), "p99_s": round(pct(good_lat, 99), 3),
        "statuses": dict(sorted(statuses.items())), "server_errors_5xx": sum(v for k, v in statuses.items() if k >= "500"),
        "well_formed_json": all(ok for *_, ok in results),
        "rss_mb": {"ready": round(rss[0], 1), "start": round(rss[1], 1),
                   "peak": round(max(server.samples or [rss[1]]), 1), "end": round(rss[2], 1)},
        "cpu_ms_per_request": {k: round(1000 * v / len(plan), 2) for k, v in cpu.items()},
        "batches": stats,
    }


def compare_modes(servers: dict[str, Server], n: int, clients: int, malformed: float, rounds: int) -> dict:
    """Both servers run side by side; the load goes to them in alternating rounds (batched first in even
    rounds, unbatched first in odd ones), so drifting load from other jobs hits both modes alike."""
    plan = make_plan(n, malformed)
    chunks = [plan[r::rounds] for r in range(rounds)]
    rss_ready = {m: rss_mb(s.proc.pid) for m, s in servers.items()}
    single = {m: single_latency(s) for m, s in servers.items()}
    acc = {m: ([], 0.0) for m in servers}
    cpu = {m: {"server": 0.0, "load_generator": 0.0} for m in servers}
    rss_start = {m: rss_mb(s.proc.pid) for m, s in servers.items()}
    samplers = [s.sample_memory() for s in servers.values()]
    for r, chunk in enumerate(chunks):
        for mode in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
            server_cpu, own_cpu = cpu_s(servers[mode].proc.pid), time.process_time()
            res, wall = send(servers[mode], chunk, clients)
            cpu[mode]["server"] += cpu_s(servers[mode].proc.pid) - server_cpu
            cpu[mode]["load_generator"] += time.process_time() - own_cpu
            acc[mode] = (acc[mode][0] + res, acc[mode][1] + wall)
    for s, t in zip(servers.values(), samplers):
        s.stop_sampling()
        t.join()
    return {m: summarise(s, plan, acc[m][0], acc[m][1], clients, single[m],
                         (rss_ready[m], rss_start[m], rss_mb(s.proc.pid)), cpu[m])
            for m, s in servers.items()}


PINGER = """
import json, sys, threading, time, httpx
url, pings, stop = sys.argv[1], [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
with httpx.Client() as c:
    while not stop.is_set():
        t = time.perf_counter(); c.get(url + "/healthz", timeout=10); pings.append(time.perf_counter() - t)
        time.sleep(0.05)
print(json.dumps(pings))
"""


def healthz_under_heatmaps(server: Server, n_heatmap: int = 16, clients: int = 4) -> dict:
    goods = good_images()

    def heat(i):
        return post(LightClient(server.url), *goods[i % len(goods)], {"heatmaps": "true"})

    # the pinger is its own process, so this process decoding megabyte heatmap bodies cannot delay its timing
    pinger = subprocess.Popen([sys.executable, "-c", PINGER, server.url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        heat_results = list(pool.map(heat, range(n_heatmap)))
    wall = time.perf_counter() - t0
    pings = json.loads(pinger.communicate("stop\n", timeout=60)[0])
    return {"heatmap_requests": n_heatmap, "heatmap_clients": clients, "wall_s": round(wall, 2),
            "heatmap_statuses": sorted({st for st, _, _ in heat_results}),
            "heatmap_p50_s": round(pct([dt for _, dt, _ in heat_results], 50), 3),
            "healthz_pings": len(pings), "healthz_p50_ms": round(1000 * pct(pings, 50), 2),
            "healthz_p99_ms": round(1000 * pct(pings, 99), 2), "healthz_max_ms": round(1000 * max(pings), 2)}


def targets(out: dict) -> list[tuple[str, str, bool]]:
    """(target, measured value, met?) for each acceptance number of issue #12."""
    b, u, h = out["batched"], out["unbatched"], out["healthz_under_heatmaps"]
    growth = {m: round(out[m]["rss_mb"]["peak"] - out[m]["rss_mb"]["start"], 1) for m in ("batched", "unbatched")}
    return [
        ("micro-batched >= 1.5x unbatched throughput", f"{out['batching_speedup']}x", out["batching_speedup"] >= 1.5),
        ("p95 <= 6x single-request latency (batched, 8 clients)", f"{out['p95_over_single']}x",
         out["p95_over_single"] <= 6),
        ("server RSS flat within 50 MB over the run (peak - run start)",
         f"batched +{growth['batched']} MB, unbatched +{growth['unbatched']} MB", max(growth.values()) <= 50),
        ("/healthz p99 < 50 ms under heatmap requests", f"{h['healthz_p99_ms']} ms", h["healthz_p99_ms"] < 50),
        ("0 5xx, every body well-formed JSON", f"{b['server_errors_5xx'] + u['server_errors_5xx']} 5xx",
         b["server_errors_5xx"] + u["server_errors_5xx"] == 0 and b["well_formed_json"] and u["well_formed_json"]),
    ]


def reading_notes(out: dict) -> list[str]:
    """Bounds the run's own CPU numbers put on the two ratios: on a CPU-bound machine, throughput is
    cores / CPU-per-request, so batching can gain at most the ratio of the two servers' CPU per
    request; and by Little's law, 8 closed-loop clients wait about clients x CPU-per-request / cores."""
    b, u = out["batched"], out["unbatched"]
    cores = os.cpu_count() or 1
    cpu_b, cpu_u = b["cpu_ms_per_request"]["server"], u["cpu_ms_per_request"]["server"]
    floor = b["clients"] * cpu_b / 1000 / cores / b["single_request_s"]
    used = round(cpu_b / 1000 * b["requests"] / b["wall_s"], 2)
    return [f"- Server CPU per request: {cpu_b} ms micro-batched, {cpu_u} ms unbatched. When both servers are "
            f"CPU-bound the throughput ratio tends to {round(cpu_u / cpu_b, 2)}x (the CPU saved per request), "
            "whatever the batch size.",
            f"- The micro-batched server used {used} of the {cores} cores while loaded (CPU seconds per second); the "
            "rest went to other jobs on the shared machine and the load generator.",
            f"- With all {cores} cores free for it, {b['clients']} clients x {cpu_b} ms / {cores} cores would put the "
            f"mean latency at about {round(floor, 1)}x the single-request latency; the measured p95 is "
            f"{out['p95_over_single']}x."]


def write_markdown(out: dict, path: Path) -> None:
    b, u, h = out["batched"], out["unbatched"], out["healthz_under_heatmaps"]
    rows = [("throughput (good req/s)", "throughput_rps"), ("single request (s, idle, median of 8)", "single_request_s"),
            ("p50 (s)", "p50_s"), ("p95 (s)", "p95_s"), ("p99 (s)", "p99_s"), ("wall (s)", "wall_s"),
            ("5xx", "server_errors_5xx"), ("every body well-formed JSON", "well_formed_json")]
    lines = [f"# vlm-xray serve under bounded load ({out['date']})", "",
             f"Command: `{out['command']}`", "",
             f"Machine: {out['machine']}. Model: {out['model']}. {b['requests']} POST /v1/predict per mode from "
             f"{b['clients']} concurrent clients on 127.0.0.1, {b['malformed_sent']} of them malformed (text, "
             "truncated PNG, 16-px image, bad option), sent in alternating rounds to the two servers running side by "
             "side. Images: "
             f"{out['images']}.", "",
             f"| | micro-batched (--max-batch {out['max_batch']}) | unbatched (--max-batch 1) |", "|---|---|---|"]
    lines += [f"| {label} | {b[k]} | {u[k]} |" for label, k in rows]
    lines += [f"| statuses | {b['statuses']} | {u['statuses']} |",
              "| server RSS ready / run start / peak / end (MB) | " + " | ".join(
                  " / ".join(str(m["rss_mb"][k]) for k in ("ready", "start", "peak", "end")) for m in (b, u)) + " |",
              "| server RSS peak - run start (MB) | " + " | ".join(
                  str(round(m["rss_mb"]["peak"] - m["rss_mb"]["start"], 1)) for m in (b, u)) + " |",
              "| CPU ms per request: server / load generator | " + " | ".join(
                  f"{m['cpu_ms_per_request']['server']} / {m['cpu_ms_per_request']['load_generator']}" for m in (b, u))
              + " |",
              f"| mean images per encoder call | {b['batches'].get('mean_batch')} | {u['batches'].get('mean_batch')} |",
              "", f"Micro-batched / unbatched throughput: **{out['batching_speedup']}x**. "
              f"p95 / single-request latency (batched): **{out['p95_over_single']}x**.", "",
              f"`/healthz` while {h['heatmap_requests']} heatmap requests ran from {h['heatmap_clients']} clients "
              f"({h['healthz_pings']} pings): p50 {h['healthz_p50_ms']} ms, p99 **{h['healthz_p99_ms']} ms**, "
              f"max {h['healthz_max_ms']} ms; heatmap request p50 {h['heatmap_p50_s']} s, statuses "
              f"{h['heatmap_statuses']}.", "",
              "| target (issue #12) | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in targets(out)]
    lines += ["", "How to read the throughput and latency ratios (numbers from this run):", ""] + reading_notes(out)
    lines += ["",
              f"Load average (1 / 5 / 15 min) of the shared machine at the start: {out['load_average_at_start']}, "
              f"at the end: {out['load_average_at_end']} (2 cores). "
              "Absolute numbers move with other jobs; the two modes share every round of load, so their ratio is "
              "the comparable number."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--malformed", type=float, default=0.1)
    ap.add_argument("--heatmap-requests", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds the requests are split into")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8, help="--max-batch of the micro-batched server")
    ap.add_argument("--out", default=str(HERE / "serve"))
    args = ap.parse_args()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": f"{os.cpu_count()} CPU cores",
           "images": f"{len(good_images())} files from " + ("../shared/data/nih14" if SHARED.is_dir() else "examples/"),
           "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])}
    out["load_average_at_start"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    out["max_batch"] = args.batch
    servers = {"batched": Server(args.batch, args.model), "unbatched": Server(1, args.model)}
    try:
        for server in servers.values():
            server.wait_ready()
        out["model"] = httpx.get(servers["batched"].url + "/readyz").json()["model"]
        out.update(compare_modes(servers, args.requests, args.clients, args.malformed, args.rounds))
        servers["unbatched"].close()
        out["healthz_under_heatmaps"] = healthz_under_heatmaps(servers["batched"], args.heatmap_requests)
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.close()
    for mode in servers:
        print(mode, json.dumps(out[mode]), flush=True)
    out["load_average_at_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    out["batching_speedup"] = round(out["batched"]["throughput_rps"] / out["unbatched"]["throughput_rps"], 2)
    out["p95_over_single"] = round(out["batched"]["p95_s"] / out["batched"]["single_request_s"], 2)
    Path(args.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(out, Path(args.out + ".md"))
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    main()
