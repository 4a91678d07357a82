"""gpt-serve under load: aggregate tokens/s at 1 and at N concurrent streams, then many clients for
a minute (latency to the first token, tokens/s, the server's resident memory).

    python benchmarks/bench_serve.py          # 124M shape, bf16: the table in docs/serving.md
    python benchmarks/bench_serve.py --checkpoint runs/NAME --dtype float32
    python benchmarks/bench_serve.py --duration 10 --load-duration 20 --load-clients 8   # quicker

Without --checkpoint a random model of the --preset's shape (default gpt2, 124M) is written to a
temporary directory. The server is a separate `python -m gpt.serve` process on 127.0.0.1 (so its
engine does not share this process's interpreter); the clients are one asyncio loop here, each
streaming /v1/completions requests back to back (greedy, `--tokens` new tokens, prompts of 4 to 40
words) until the phase's time is up; a phase ends when its last request has finished.

1. Streams: for each count in --streams, that many clients for --duration seconds (after a short
   warm-up), in --rounds rounds, each round's ratio against its own one-stream phase (a shared
   machine's load drifts). Aggregate tokens/s = tokens received / the phase's wall time. Goal: 8
   streams >= 4x one.
2. Load: --load-clients clients for --load-duration seconds, each request asking for 16 to
   2 x --tokens new tokens. Time to first token (request sent -> first token chunk received,
   waiting for a free row included) p50/p95, tokens/s, errors, and the server's resident memory
   (VmRSS of its process, sampled each second) after the first 10 s and at the end.

On a 2-core machine the clients take CPU from the server: the figures are for the two together.
The engine's own counters (/health) split each streams phase's time into batched decode steps (rows
per step, ms per step) and prompt prefills.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("the sea river light morning house every effort moves you toward a quiet town where "
        "people read old books and the wind carries voices over fields of grain")
WORDS = TEXT.split(" ")
ENGINE_COUNTERS = ("decode_steps", "decode_rows", "decode_seconds", "prefill_seconds")


@dataclass
class Phase:
    """What the clients of one phase measured."""

    clients: int
    seconds: float = 0.0
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.first_token:
            return float("nan")
        ordered = sorted(self.first_token)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_checkpoint(preset: str, directory: Path) -> None:
    """A random model of `preset`'s shape, saved as a run (in a subprocess: its memory is freed)."""
    code = ("import sys, torch; from gpt.model.config import GPTConfig; from gpt.model.model "
            "import GPT; from gpt.checkpoints.checkpoint import save_model; torch.manual_seed(0); "
            "p = __import__('pathlib').Path(sys.argv[2]) / 'best'; p.mkdir(parents=True); "
            "save_model(GPT(GPTConfig.preset(sys.argv[1], drop_rate=0.0)), p)")
    subprocess.run([sys.executable, "-c", code, preset, str(directory)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(run: Path, dtype: str, max_batch: int, port: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt.serve", "--checkpoint", str(run), "--dtype", dtype,
         "--device", "cpu", "--port", str(port), "--max-batch", str(max_batch),
         "--model-name", "bench"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise SystemExit(f"gpt-serve exited: {process.stderr.read() if process.stderr else ''}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
            return process
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit("gpt-serve did not start within 300 s") from None
            time.sleep(0.5)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def request(client: httpx.AsyncClient, phase: Phase, prompt: str, tokens: int) -> None:
    """One streamed completion; its first-token latency and tokens go to `phase`."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                phase.errors.append(f"HTTP {response.status_code}: {await response.aread()!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    phase.errors.append(chunk["error"]["message"])
                    return
                if not chunk["choices"]:  # include_usage's own chunk (the last chunk has it too)
                    phase.tokens += chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["finish_reason"] is None:
                    first = time.perf_counter() - sent
    except httpx.HTTPError as exc:
        phase.errors.append(f"{type(exc).__name__}: {exc}")
        return
    phase.requests += 1
    if first is not None:
        phase.first_token.append(first)


async def run_phase(url: str, pid: int, clients: int, seconds: float, tokens: tuple[int, int],
                    seed: int) -> Phase:
    phase = Phase(clients)
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop(i: int) -> None:
            while time.perf_counter() < deadline:
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
                await request(client, phase, f"Client {i}: {words}", rng.randint(*tokens))

        async def sample_memory() -> None:
            while True:
                phase.rss.append((time.perf_counter() - started, rss_bytes(pid)))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        phase.seconds = time.perf_counter() - started
        sampler.cancel()
    return phase


def rss_at(phase: Phase, seconds: float) -> int:
    return min(phase.rss, key=lambda sample: abs(sample[0] - seconds))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a run to serve (default: a random model)")
    parser.add_argument("--preset", default="gpt2", help="the random model's shape (default gpt2)")
    parser.add_argument("--dtype", default="bfloat16", help="gpt-serve --dtype (default bfloat16)")
    parser.add_argument("--streams", default="1,8", help="concurrent streams to compare (1,8)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request (64)")
    parser.add_argument("--duration", type=float, default=30, help="seconds per streams phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the streams phases (2)")
    parser.add_argument("--load-clients", type=int, default=32, help="clients of the load run")
    parser.add_argument("--load-duration", type=float, default=60, help="seconds of the load run")
    parser.add_argument("--max-batch", type=int, default=32, help="gpt-serve --max-batch (32)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.checkpoint
        if run is None:
            run = Path(tmp) / f"random-{args.preset}"
            make_checkpoint(args.preset, run)
        port = free_port()
        server = start_server(run, args.dtype, args.max_batch, port)
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {cpu_name()}, "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
                  f"{run.name}, {args.dtype}", flush=True)
            asyncio.run(run_phase(url, server.pid, 2, 5, (8, 8), 0))  # warm-up
            print("\n| round | concurrent streams | requests | tokens | seconds | aggregate "
                  "tokens/s | per stream tokens/s | TTFT p50 | vs 1 stream (same round) | rows per "
                  "step | ms per step | prefill s | decode s | load average "
                  "|\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for round_ in range(1, args.rounds + 1):  # rounds alternate: a shared machine drifts
                base = None
                for count in (int(c) for c in args.streams.split(",")):
                    before = httpx.get(f"{url}/health").json()
                    phase = asyncio.run(run_phase(url, server.pid, count, args.duration,
                                                  (args.tokens, args.tokens), count + round_))
                    after = httpx.get(f"{url}/health").json()
                    engine = {k: after[k] - before[k] for k in ENGINE_COUNTERS}
                    base = base or phase.tokens_per_s
                    print(f"| {round_} | {count} | {phase.requests} | {phase.tokens} | "
                          f"{phase.seconds:.1f} | {phase.tokens_per_s:.1f} | "
                          f"{phase.tokens_per_s / count:.1f} | {phase.percentile(0.5) * 1000:.0f} "
                          f"ms | {phase.tokens_per_s / base:.2f}x | "
                          f"{engine['decode_rows'] / max(1, engine['decode_steps']):.1f} | "
                          f"{1000 * engine['decode_seconds'] / max(1, engine['decode_steps']):.0f} "
                          f"| {engine['prefill_seconds']:.1f} | {engine['decode_seconds']:.1f} | "
                          f"{os.getloadavg()[0]:.1f} |", flush=True)
                    if phase.errors:
                        print(f"errors: {phase.errors[:3]}")
            load = asyncio.run(run_phase(url, server.pid, args.load_clients, args.load_duration,
                                         (16, 2 * args.tokens), 99))
            print(f"\n| clients | seconds | requests | errors | tokens/s | TTFT p50 | TTFT p95 | "
                  f"RSS at 10 s | RSS at end | RSS max | load average |\n|---:|---:|---:|---:|---:|"
                  f"---:|---:|---:|---:|---:|---:|\n| {args.load_clients} | {load.seconds:.1f} | "
                  f"{load.requests} | {len(load.errors)} | {load.tokens_per_s:.1f} | "
                  f"{load.percentile(0.5):.2f} s | {load.percentile(0.95):.2f} s | "
                  f"{rss_at(load, 10) / 2**20:.0f} MiB | {load.rss[-1][1] / 2**20:.0f} MiB | "
                  f"{max(b for _, b in load.rss) / 2**20:.0f} MiB | {os.getloadavg()[0]:.1f} |")
            if load.errors:
                print(f"errors: {load.errors[:3]}")
            health = httpx.get(f"{url}/health").json()
            print(f"\nafter the load: {health}")
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
