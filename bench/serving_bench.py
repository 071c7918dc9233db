#!/usr/bin/env python3
"""Serving benchmark: colocated vs prefill/decode disaggregation on loopback, same run.

For each mode it starts a real `cleave serve` process tree (tests/e2e/conftest.py's Cluster),
then drives the OpenAI completions endpoint with a load generator at each concurrency:
  - aiperf (NVIDIA's LLM load generator, from PyPI) when `--aiperf PATH` points at its binary;
  - otherwise a small asyncio generator of ours on the openai SDK (streaming, same metrics).
Reports time to first token, time per output token (inter-token latency), output throughput,
and the P/D / colocated ratio of each, as a Markdown table.

  python3 bench/serving_bench.py [--aiperf .venv-bench/bin/aiperf] [--requests 64]
"""
import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from conftest import Cluster  # noqa: E402

MODES = {
    "colocated": [dict(role="colocated", replicas=1, kv_blocks=4096, threads=1, max_running=256)],
    "pd": [dict(role="prefill", replicas=1, kv_blocks=2048, threads=1),
           dict(role="decode", replicas=1, kv_blocks=4096, threads=1, max_running=256)],
}


async def one_request(client, prompt, osl, out):
    t0 = time.perf_counter()
    first = None
    stamps = []
    stream = await client.completions.create(model="stories260K", prompt=prompt, max_tokens=osl,
                                             temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            if first is None:
                first = now
            stamps.append(now)
    end = time.perf_counter()
    tokens = len(stamps)
    tpot = (end - first) / (tokens - 1) if tokens > 1 and first else float("nan")
    out.append(dict(ttft=(first or end) - t0, tpot=tpot, tokens=tokens, latency=end - t0))


async def own_loadgen(url, concurrency, requests, isl_words, osl):
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    prompts = [" ".join(["once upon a time there was a little"] * (isl_words // 8 + 1)) + f" {i}"
               for i in range(requests)]
    results, queue = [], list(prompts)

    async def lane():
        while queue:
            await one_request(client, queue.pop(), osl, results)
    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return dict(ttft_ms=1e3 * statistics.median(r["ttft"] for r in results),
                tpot_ms=1e3 * statistics.median(r["tpot"] for r in results if r["tpot"] == r["tpot"]),
                throughput=sum(r["tokens"] for r in results) / wall)


def hf_tokenizer_dir(workdir):
    """aiperf counts tokens with a Hugging Face tokenizer: the bundled model's SentencePiece file
    with a tokenizer_config.json, so nothing is fetched from the network."""
    d = Path(workdir) / "hf-tokenizer"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes((ROOT / "models/stories260K/tokenizer.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "legacy": True}))
    return d


def aiperf_run(aiperf, url, concurrency, requests, isl, osl, workdir):
    out = Path(workdir) / f"aiperf-c{concurrency}"
    cmd = [aiperf, "profile", "--model", "stories260K", "--url", url, "--endpoint-type", "completions",
           "--streaming", "--concurrency", str(concurrency), "--request-count", str(requests),
           "--isl", str(isl), "--osl", str(osl), "--tokenizer", str(hf_tokenizer_dir(workdir)),
           "--use-server-token-count",
           "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
           "--artifact-dir", str(out), "--ui-type", "none", "--random-seed", "7"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=1800)
    data = json.loads((out / "profile_export_aiperf.json").read_text())

    def avg(name):
        m = data.get(name) or data.get("records", {}).get(name, {})
        return m.get("p50", m.get("avg"))
    return dict(ttft_ms=avg("time_to_first_token"), tpot_ms=avg("inter_token_latency"),
                throughput=avg("output_token_throughput"), cmd=" ".join(cmd))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--aiperf", help="path to the aiperf binary (else our own load generator)")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--isl", type=int, default=128, help="prompt tokens (about)")
    ap.add_argument("--osl", type=int, default=64, help="output tokens")
    ap.add_argument("--out", help="write the Markdown table here too")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, workers in MODES.items():
            (Path(tmp) / mode).mkdir()
            cluster = Cluster(Path(tmp) / mode, workers, max_waiting=4096)
            try:
                for c in levels:
                    n = max(args.requests, 4 * c)
                    if args.aiperf:
                        r = aiperf_run(args.aiperf, cluster.url, c, n, args.isl, args.osl, Path(tmp) / mode)
                    else:
                        r = asyncio.run(own_loadgen(cluster.url, c, n, args.isl, args.osl))
                    table[(mode, c)] = r
                    print(f"{mode:9s} c={c:<3d} ttft={r['ttft_ms']:.2f} ms tpot={r['tpot_ms']:.3f} ms "
                          f"throughput={r['throughput']:.1f} tok/s", flush=True)
            finally:
                cluster.stop()
    lines = ["| concurrency | metric | colocated | P/D | P/D / colocated |", "|---|---|---|---|---|"]
    for c in levels:
        for key, name in (("ttft_ms", "TTFT p50 (ms)"), ("tpot_ms", "TPOT p50 (ms)"),
                          ("throughput", "output tok/s")):
            a, b = table[("colocated", c)][key], table[("pd", c)][key]
            lines.append(f"| {c} | {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
