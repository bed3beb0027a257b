"""Serving figures on loopback: `raygpt serve` as a user starts it (its own local Ray cluster), driven by
concurrent HTTP clients.

    python bench/serve_speed.py [--requests 64] [--max-tokens 64] [--clients 1,8,32] [--no-int8]
    python bench/serve_speed.py --checkpoint runs/NAME/step_N     # a trained checkpoint instead

Prints, side by side in one run:
  - the time from `raygpt serve` to the first answered completion;
  - tokens/s and p50 / p99 request latency at each number of clients, with batching on
    (serve.max_batch_size=32) and off (serve.max_batch_size=1: one request per forward pass);
  - the batched / unbatched throughput ratio at each number of clients;
  - int8 (serve.quantize=int8) against fp32 tokens/s, batching on.
The default model is configs/shakespeare_char.yaml's shape (6 layers, 384 wide, block 256, 10.7M parameters)
with random weights and a char vocabulary: speed does not depend on what it learned. Every request samples
max_tokens tokens at temperature 0.8 (a row that draws end-of-text ends early; tokens/s counts the tokens
the server reports in usage). It asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import string
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from raygpt.checkpoint import save_checkpoint  # noqa: E402
from raygpt.config import load_config  # noqa: E402
from raygpt.model import GPT  # noqa: E402
from raygpt.serve.server import ServeProcess  # noqa: E402
from raygpt.tokenizer import train_tokenizer  # noqa: E402

PROMPTS = ["ROMEO:", "To be, or not to be", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "O", "KING RICHARD III:\nNow is the winter of our discontent"]
SERVE = ["serve.max_ongoing_requests=64", "serve.max_queued_requests=-1", "serve.batch_wait_s=0.01"]


def random_checkpoint(folder: Path) -> Path:
    """configs/shakespeare_char.yaml's model, random weights, a char vocabulary of printable ASCII."""
    tok = train_tokenizer("char", [string.printable])
    cfg = load_config("configs/shakespeare_char.yaml", [f"model.vocab_size={tok.vocab_size}", "model.dropout=0"])
    torch.manual_seed(0)
    return save_checkpoint(folder / "shakespeare_char", GPT(cfg.model), cfg, tok)


def ask(url: str, body: dict) -> tuple[float, int]:
    """(seconds, completion tokens) of one request."""
    start = time.perf_counter()
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - start, answer["usage"]["completion_tokens"]


def load(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending its next request when the last is answered, ``requests`` in all."""
    results, lock, counter = [], threading.Lock(), iter(range(requests))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
            results.append(ask(url, body))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(s for s, _ in results)
    return {"tokens_per_s": sum(n for _, n in results) / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], "requests": len(results),
            "wall_s": wall}


def first_answer(server: ServeProcess, timeout: float = 300) -> float:
    """Seconds from the `raygpt serve` process's start to its first answered completion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ask(server.url, {"prompt": "O", "max_tokens": 1})
            return time.monotonic() - server.started
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"no answer in {timeout} s:\n{server.output()[-3000:]}")


def run_server(checkpoint: Path, extra: list[str], clients: list[int], requests: int, max_tokens: int) -> dict:
    with ServeProcess(checkpoint, *SERVE, *extra) as server:
        startup = first_answer(server)
        load(server.url, 4, 8, max_tokens)  # warm-up: the first forward passes, the proxy's connections
        rows = {c: load(server.url, c, max(requests, 2 * c) if c > 1 else max(8, requests // 4), max_tokens)
                for c in clients}
    return {"startup_s": startup, "rows": rows}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a raygpt checkpoint (default: a random shakespeare_char model)")
    p.add_argument("--requests", type=int, default=64, help="requests per row (at least 2 per client)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--no-int8", action="store_true", help="leave out the int8 server")
    a = p.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="rg-serve-bench-") as tmp:
        checkpoint = Path(a.checkpoint) if a.checkpoint else random_checkpoint(Path(tmp))
        runs = {"batched": run_server(checkpoint, ["serve.max_batch_size=32"], clients, a.requests, a.max_tokens),
                "unbatched": run_server(checkpoint, ["serve.max_batch_size=1"], clients, a.requests, a.max_tokens)}
        if not a.no_int8:
            runs["int8"] = run_server(checkpoint, ["serve.max_batch_size=32", "--quantize", "int8"], clients,
                                      a.requests, a.max_tokens)
    print(f"\nraygpt serve on loopback, {platform.node()} ({torch.get_num_threads()} threads), "
          f"{datetime.date.today()}, torch {torch.__version__}; {a.max_tokens} tokens per request")
    for name, run in runs.items():
        print(f"  {name:<10} `raygpt serve` to the first answer: {run['startup_s']:.1f} s")
    print(f"\n  {'server':<10} {'clients':>7} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7} {'requests':>8}")
    for name, run in runs.items():
        for c, row in run["rows"].items():
            print(f"  {name:<10} {c:>7} {row['tokens_per_s']:>9.1f} {row['p50_s']:>7.2f} {row['p99_s']:>7.2f} "
                  f"{row['requests']:>8}")
    print()
    for c in clients:
        b, u = runs["batched"]["rows"][c], runs["unbatched"]["rows"][c]
        line = f"  {c:>2} clients: batched / unbatched throughput {b['tokens_per_s'] / u['tokens_per_s']:.2f}x"
        if "int8" in runs:
            line += f"; int8 / fp32 (batched) {runs['int8']['rows'][c]['tokens_per_s'] / b['tokens_per_s']:.2f}x"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
