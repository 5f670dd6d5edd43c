"""Throughput of `steerwise serve`: N concurrent clients batched vs one at a time, steered vs not.

    python benchmarks/bench_server.py [--clients 8] [--requests 8] [--tokens 48] [--repeats 7]

Starts two servers as subprocesses on 127.0.0.1 (`steerwise serve --demo`: concept-lm with the
demo's CAA + DSAS 'pear' recipe on all 4 layers): one batching up to ``--clients`` rows with
continuous joining, one with ``--max-batch 1`` (requests served one at a time). The clients
run in this process (asyncio + httpx): ``--clients`` of them, each sending ``--requests``
greedy completions of ``--tokens`` tokens back to back, all unsteered, all steered (pear at 5),
or mixed (half unsteered, half steered at strengths 2–8). Configurations rotate within each
repeat; the table shows medians of generated tokens per second, of per-request latency, and
the throughput ratios paired within each repeat (median, min–max). Writes
benchmarks/results/server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.tasks import concepts

console = Console(width=120)
MODES = ("unsteered", "steered", "mixed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "steerwise.cli", "serve", "--demo", "--device", "cpu",
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", "256",
           "--threads", str(threads), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server failed: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start in 180 s")


def steering_for(mode: str, i: int) -> dict:
    if mode == "unsteered" or (mode == "mixed" and i % 2 == 0):
        return {"recipe": None}
    return {"recipe": "pear", "strength": 5.0 if mode == "steered" else 2.0 + (i % 4) * 2.0}


async def run_load(url: str, mode: str, prompts: list[str], clients: int, requests: int,
                   tokens: int) -> dict:
    latencies: list[float] = []
    generated = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal generated
        for k in range(requests):
            i = c * requests + k
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json={
                "model": "concept-lm", "prompt": prompts[i % len(prompts)], "max_tokens": tokens,
                "temperature": 0, "steering": steering_for(mode, i)})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            generated += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as h:
        before = (await h.get(url + "/health")).json()
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c, h) for c in range(clients)])
        wall = time.perf_counter() - t0
        after = (await h.get(url + "/health")).json()
    calls = {k: after[k] - before[k] for k in ("prefills", "steps")}
    return {"wall_s": wall, "tokens": generated, "tokens_per_s": generated / wall,
            "median_latency_s": statistics.median(latencies), "requests": len(latencies),
            **calls, "tokens_per_forward": generated / max(1, sum(calls.values()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=8, help="per client, back to back")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each server (1: two servers on a shared 2-core box)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server.json"))
    args = ap.parse_args(argv)

    groups = concepts.demo_prompts(seed=1, n_per_topic=8)
    prompts = [p for ps in groups.values() for p in ps]
    servers = {}
    try:
        for name, max_batch in (("batched", args.clients), ("one at a time", 1)):
            servers[name] = start_server(max_batch, args.threads)
        configs = [(s, m) for s in servers for m in MODES]
        runs: dict[str, list[dict]] = {f"{s} / {m}": [] for s, m in configs}
        for _, url in servers.values():  # warm-up: first requests pay one-off costs
            asyncio.run(run_load(url, "mixed", prompts, 2, 1, 4))
        for rep in range(args.repeats):
            for s, m in configs[rep % len(configs):] + configs[: rep % len(configs)]:
                res = asyncio.run(run_load(servers[s][1], m, prompts, args.clients,
                                           args.requests, args.tokens))
                runs[f"{s} / {m}"].append(res)
                console.print(f"  rep {rep} {s:>13} / {m:<9} {res['tokens_per_s']:8.1f} tok/s")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)

    med = {k: {key: statistics.median(r[key] for r in v)
               for key in ("tokens_per_s", "median_latency_s", "tokens_per_forward")}
           for k, v in runs.items()}
    table = Table(title=f"steerwise serve, concept-lm: {args.clients} clients × {args.requests} "
                        f"requests × {args.tokens} tokens, median of {args.repeats}")
    for col in ("server", "requests", "tokens/s", "latency (median)", "tokens per forward",
                "vs one at a time", "vs unsteered"):
        table.add_column(col, justify="right" if col != "server" else "left")
    def paired(a: str, b: str) -> dict[str, float]:
        """Throughput ratio a/b within each repeat (measured minutes apart at most)."""
        xs = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    def show(r: dict[str, float]) -> str:
        return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"

    ratios = {}
    for s in servers:
        for m in MODES:
            k = f"{s} / {m}"
            ratios[k] = {"vs_one_at_a_time": paired(k, f"one at a time / {m}"),
                         "vs_unsteered": paired(k, f"{s} / unsteered")}
            table.add_row(s, m, f"{med[k]['tokens_per_s']:.1f}",
                          f"{med[k]['median_latency_s'] * 1000:.0f} ms",
                          f"{med[k]['tokens_per_forward']:.2f}",
                          show(ratios[k]["vs_one_at_a_time"]), show(ratios[k]["vs_unsteered"]))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/bench_server.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args), "recipe": "demo 'pear' (CAA + DSAS, 4 residual layers)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "note": "shared machine (other jobs running)"},
        "runs": runs, "medians": med, "ratios": ratios,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=2) + "\n")
    console.print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
