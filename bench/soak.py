"""Soak test: hundreds of mixed requests through TorchServe with the shipped configuration.

    python bench/soak.py [--requests 520] [--concurrency 8] [--model DIR] [--out bench/results/soak.json]

The server runs the shipped config.properties (token authorization on, model API off; only its
addresses, ports and model store are replaced) and the shipped model-config.yaml, serving the
checkpoint, with one change: ``--dtype`` (float32 by default) replaces its ``dtype: auto``, because
answers are compared with the offline engine's token for token, and bf16 GEMMs round differently
for different batch shapes (``--dtype shipped`` keeps auto; the real-model tests hold bf16 to its
closeness rule instead). A seeded plan mixes native and OpenAI requests, streamed and not, gRPC, n > 1, beam
search, seeded sampling, bad inputs and clients that disconnect in the middle of a stream, sent
``--concurrency`` at a time. Checked, and printed as a table (JSON in ``--out``):

- every good answer is complete, and greedy, seeded and beam answers equal the offline engine's
  (paged.LLM with the same engine settings, computed before the server starts);
- every bad request gets a 400 JSON error;
- the worker never restarts (same pid, no engine rebuild), the KV pool is whole after the drain,
  and the frontend holds no request job any more;
- memory: frontend (JVM) and worker RSS after warm-up and after the drain.

Exit status 0 only if every check passes. Takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# Run from the repository root: bench/ (generic script names) off the import path, the root on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402

GREEDY = {"temperature": 0.0, "ignore_eos": True}
SUBJECTS = ["fibonacci", "quicksort", "binary search", "a linked list", "a web server", "json parsing",
            "matrix multiply", "a retry loop", "an LRU cache", "prime numbers", "string reversal", "a trie"]
KINDS = {  # kind -> weight in the plan
    "native": 13, "native_stream": 11, "native_seeded": 8, "native_n2_seeded_stream": 6, "native_beam": 5,
    "completions": 8, "completions_stream": 7, "chat": 6, "chat_stream": 5, "grpc": 8, "bad": 14, "disconnect": 9,
}


def bad_requests(vocab_size: int) -> list[tuple[bytes, str | None]]:
    """Malformed or out-of-range bodies and the field each 400 must name; token ids past the
    checkpoint's vocabulary are out of range whatever the model."""
    return [
        (b'{"prompt": "x", "top_p": 7}', "top_p"),
        (b'{"prompt": "\\ud800"}', "prompt"),
        (b"{not json", None),
        (b'{"prompt": "x", "max_tokenz": 4}', "max_tokenz"),
        (b'{"prompt": "x", "n": 100}', "n"),
        (b'{"prompt": "x", "repetition_penalty": 1e-300}', "repetition_penalty"),
        (b'{"prompt": "x", "stop_token_ids": [%d]}' % vocab_size, "stop_token_ids"),
        (b'{"prompt": "x", "stop": ' + b"[" * 64 + b"]" * 64 + b"}", "stop"),
        (b'{"prompt": [1, 2, %d]}' % (vocab_size + 99), "prompt"),
        (b'{"prompt": "x", "max_tokens": 100000}', "max_tokens"),
    ]


@dataclass
class Planned:
    index: int
    kind: str
    body: dict | bytes
    expect: dict | None = None     # reference: {"token_ids": [[...]], "text": [...]} or the 400's param


@dataclass
class Result:
    index: int
    kind: str
    ok: bool
    status: int | None
    latency_s: float
    detail: str = ""


@dataclass
class Soak:
    base: str
    grpc_port: int
    key: str
    stubs: tuple | None = None
    results: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------- plan
def prompts(rng: random.Random, n: int) -> list[str]:
    forms = ["def {}(x):\n    ", "# {} in Python\n", "class {}:\n    def __init__(self", "Explain {} briefly:"]
    return [rng.choice(forms).format(rng.choice(SUBJECTS).replace(" ", "_")) + " " * rng.randint(0, 3)
            for _ in range(n)]


def make_plan(n: int, seed: int, vocab_size: int) -> list[Planned]:
    rng = random.Random(seed)
    bad = bad_requests(vocab_size)
    pool = prompts(rng, 48)
    kinds = [k for k, w in KINDS.items() for _ in range(w)]
    rng.shuffle(kinds)
    plan = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        prompt = rng.choice(pool)
        tokens = rng.choice([8, 12, 16, 24])
        if kind == "bad":
            body, param = bad[i % len(bad)]
            plan.append(Planned(i, kind, body, {"param": param}))
            continue
        if kind.startswith("native") or kind in ("grpc", "disconnect"):
            body = {"prompt": prompt, "max_tokens": tokens, **GREEDY}
            if kind == "native_seeded":
                body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.8, "top_p": 0.95, "seed": i}
            elif kind == "native_n2_seeded_stream":
                body = {"prompt": prompt, "max_tokens": tokens, "temperature": 1.0, "n": 2, "seed": i}
            elif kind == "native_beam":
                body = {"prompt": prompt, "max_tokens": tokens, "beam_width": 3, "n": 2, **GREEDY}
            elif kind == "disconnect":
                body["max_tokens"] = 48
            body["stream"] = kind.endswith("stream") or kind == "disconnect"
        elif kind.startswith("completions"):
            body = {"model": "llm", "prompt": prompt, "max_tokens": tokens, "temperature": 0.0}
            if kind.endswith("stream"):
                body.update(stream=True, stream_options={"include_usage": True})
        else:  # chat
            body = {"model": "llm", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                    "temperature": 0.0, "stream": kind.endswith("stream")}
        plan.append(Planned(i, kind, body))
    return plan


def attach_references(plan: list[Planned], model_dir: str, engine_settings: dict) -> None:
    """The offline engine's answer for every good request (one batch, each with its own parameters)."""
    import asyncio

    from paged_handler.tokenization import TokenizerPool
    from paged_tools.offline_reference import OfflineReference

    tokenizers = TokenizerPool(model_dir, threads=1)
    reference = OfflineReference(model_dir, engine_settings)
    try:
        good = [p for p in plan if p.kind not in ("bad", "disconnect")]
        prompts_, params_list = [], []
        for p in good:
            body = p.body
            prompts_.append(asyncio.run(tokenizers.encode_chat(body["messages"], True)) if p.kind.startswith("chat")
                            else body["prompt"])
            params_list.append({k: v for k, v in body.items()
                                if k not in ("prompt", "messages", "model", "stream", "stream_options")})
        for p, out in zip(good, reference.generate_each(prompts_, params_list)):
            p.expect = {"token_ids": out["token_ids"], "text": out["text"], "finish_reason": out["finish_reason"]}
    finally:
        reference.close()
        tokenizers.shutdown()


# ---------------------------------------------------------------------------------------- clients
def headers(s: Soak) -> dict:
    return {"Authorization": f"Bearer {s.key}", "Content-Type": "application/json"}


def url(s: Soak, kind: str) -> str:
    if kind.startswith("completions"):
        return f"{s.base}/predictions/llm/1.0/v1/completions"
    if kind.startswith("chat"):
        return f"{s.base}/predictions/llm/1.0/v1/chat/completions"
    return f"{s.base}/predictions/llm"


def read_stream(r, sse: bool) -> list[dict]:
    events = []
    for line in r.iter_lines():
        if not line:
            continue
        text = line.decode()
        if sse:
            if not text.startswith("data: ") or text == "data: [DONE]":
                continue
            text = text[len("data: "):]
        events.append(json.loads(text))
    return events


def joined(events: list[dict], chat: bool = False) -> tuple[dict, dict, dict, list]:
    """Per choice index: text, token ids, finish reason; plus any error objects."""
    text, ids, finish, errors = {}, {}, {}, []
    for e in events:
        if "error" in e:
            errors.append(e["error"])
            continue
        for c in e.get("choices", []):
            piece = (c.get("delta") or {}).get("content") if chat else c.get("text")
            text[c["index"]] = text.get(c["index"], "") + (piece or "")
            ids.setdefault(c["index"], []).extend(c.get("token_ids", []))
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    return text, ids, finish, errors


def check(p: Planned, status: int, obj: dict | None, events: list[dict] | None) -> tuple[bool, str]:
    exp = p.expect
    if status != 200:
        return False, f"status {status}"
    chat = p.kind.startswith("chat")
    if events is not None:
        text, ids, finish, errors = joined(events, chat)
        if errors:
            return False, f"error in stream: {errors[0]}"
    else:
        choices = obj["choices"]
        text = {c["index"]: (c["message"]["content"] if chat else c["text"]) for c in choices}
        ids = {c["index"]: c.get("token_ids", []) for c in choices}
        finish = {c["index"]: c["finish_reason"] for c in choices}
    n = len(exp["token_ids"])
    if sorted(text) != list(range(n)) or any(finish.get(i) is None for i in range(n)):
        return False, f"incomplete: choices {sorted(text)}, finish {finish}"
    for i in range(n):
        if p.kind.startswith(("native", "grpc")) and ids[i] != exp["token_ids"][i]:
            return False, f"choice {i}: token ids differ from the offline engine"
        if text[i] != exp["text"][i]:
            return False, f"choice {i}: text differs from the offline engine"
        if finish[i] != exp["finish_reason"][i]:
            return False, f"choice {i}: finish_reason {finish[i]} != {exp['finish_reason'][i]}"
    return True, ""


def send(s: Soak, p: Planned) -> Result:
    t0 = time.perf_counter()
    try:
        ok, status, detail = _send(s, p)
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        ok, status, detail = False, None, f"{type(exc).__name__}: {str(exc)[:200]}"
    return Result(p.index, p.kind, ok, status, time.perf_counter() - t0, detail)


def _send(s: Soak, p: Planned) -> tuple[bool, int | None, str]:
    if p.kind == "grpc":
        pb, pb_grpc, channel = s.stubs
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        req = pb.PredictionsRequest(model_name="llm", input={"data": json.dumps(p.body).encode()})
        obj = json.loads(stub.Predictions(req, timeout=600, metadata=(("authorization", f"Bearer {s.key}"),))
                         .prediction)
        if "error" in obj:
            return False, obj["error"]["code"], obj["error"]["message"]
        ok, detail = check(p, 200, obj, None)
        return ok, 200, detail
    if p.kind == "bad":
        r = requests.post(url(s, p.kind), data=p.body, headers=headers(s), timeout=600)
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        ok = r.status_code == 400 and err.get("param") == p.expect["param"] and bool(err.get("message"))
        return ok, r.status_code, "" if ok else r.text[:200]
    stream = p.body.get("stream", False)
    r = requests.post(url(s, p.kind), json=p.body, headers=headers(s), stream=stream, timeout=600)
    if p.kind == "disconnect":
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines >= 2:
                break
        r.close()  # the client goes away in the middle of the stream
        return r.status_code == 200 and lines >= 1, r.status_code, ""
    if stream:
        events = read_stream(r, sse=not p.kind.startswith("native"))
        ok, detail = check(p, r.status_code, None, events)
    else:
        ok, detail = check(p, r.status_code, r.json() if r.status_code == 200 else None, None)
    return ok, r.status_code, detail


# ---------------------------------------------------------------------------------------- server
def start_server(work: Path, model_dir: str, model_config: dict):
    """TorchServe on the shipped config.properties, serving ``model_dir`` with ``model_config``
    (the shipped model-config.yaml as main() read it, its dtype already chosen)."""
    from paged_tools.ts_launcher import ROOT as REPO, TorchServe, build_model_folder, free_ports, parse_properties

    shipped = parse_properties((REPO / "config.properties").read_text())
    model_config = dict(model_config)
    handler = model_config.pop("handler")
    ts = TorchServe(work, free_ports(5), properties=shipped)
    ts.store.mkdir(parents=True, exist_ok=True)
    build_model_folder(ts.store, "llm", Path(model_dir).resolve(), handler, extra_yaml=model_config)
    ts.start("llm=llm")
    ts.wait_ready("llm", timeout=1800)
    return ts, handler


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def drained(ts, timeout: float = 120) -> dict:
    t0, d = time.time(), {}
    while time.time() - t0 < timeout:
        d = ts.describe()
        kv = d["kv_stats"]
        if d["inflight_requests"] == 0 and kv["free_blocks"] == kv["num_blocks"] and kv["num_running"] == 0 \
                and kv["num_waiting"] == 0:
            break
        time.sleep(1)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "model-store" / "tiny-llama"))
    ap.add_argument("--requests", type=int, default=520)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "shipped"),
                    help="the one setting that replaces the shipped model-config.yaml's (dtype: auto): "
                         "answers must equal the offline engine's token for token, and only fp32 "
                         "arithmetic is independent of how requests are batched together")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = ap.parse_args()

    from paged_handler.settings import parse_handler_config

    model_config = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    if args.dtype != "shipped":
        model_config["handler"]["dtype"] = args.dtype
    config, _ = parse_handler_config(model_config["handler"], args.model)
    engine_settings = {k: v for k, v in config.to_dict().items() if k not in ("model", "request_timeout_s")}
    vocab_size = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    plan = make_plan(args.requests, args.seed, vocab_size)
    t0 = time.time()
    print(f"computing offline references for {sum(p.kind not in ('bad', 'disconnect') for p in plan)} requests ...",
          flush=True)
    attach_references(plan, args.model, engine_settings)
    print(f"references ready in {time.time() - t0:.0f} s; starting TorchServe (shipped configuration) ...", flush=True)

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    ts, _ = start_server(work, args.model, model_config)
    report: dict = {"requests": args.requests, "concurrency": args.concurrency, "seed": args.seed,
                    "host_cpus": os.cpu_count(), "load_avg_1m_before": round(os.getloadavg()[0], 2)}
    try:
        import grpc

        from paged_tools.grpc_stubs import load_stubs

        pb, pb_grpc = load_stubs(work / "grpc_stubs")
        channel = grpc.insecure_channel(f"127.0.0.1:{ts.grpc}")
        soak = Soak(ts.base, ts.grpc, ts.keys()["inference"], (pb, pb_grpc, channel))
        warm = send(soak, next(p for p in plan if p.kind == "native"))
        assert warm.ok, f"warm-up request failed: {warm.detail}"
        pid = ts.worker_pid()
        memory = {"frontend_rss_mb_before": rss_mb(ts.java_pid), "worker_rss_mb_before": rss_mb(pid)}
        t_start = time.time()
        samples, done = [], threading.Event()

        def sample_memory():  # RSS every few seconds: growth that levels off is warm-up, not a leak
            while not done.wait(5.0):
                samples.append((round(time.time() - t_start, 1), rss_mb(ts.java_pid), rss_mb(pid)))
        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda p: send(soak, p), plan))
        elapsed = time.time() - t_start
        done.set()
        sampler.join()
        d = drained(ts)
        kv = d["kv_stats"]
        memory.update(frontend_rss_mb_after=rss_mb(ts.java_pid), worker_rss_mb_after=rss_mb(ts.worker_pid()),
                      samples_s_frontend_worker=samples)
        checks = {
            "all good answers complete and equal to offline": all(r.ok for r in results if r.kind != "bad"),
            "all bad requests a 400 naming the field": all(r.ok for r in results if r.kind == "bad"),
            "worker restarts": 0 if ts.worker_pid() == pid else 1,
            "engine rebuilds": d.get("engine_restarts", 0),
            "KV pool whole after drain": kv["free_blocks"] == kv["num_blocks"],
            "frontend jobs left": ts.frontend_jobs(),
        }
        channel.close()
    finally:
        ts.stop()
    passed = (checks["all good answers complete and equal to offline"] and checks["all bad requests a 400 naming the field"]
              and checks["worker restarts"] == 0 and checks["engine rebuilds"] == 0
              and checks["KV pool whole after drain"] and checks["frontend jobs left"] == 0)
    by_kind = {}
    for kind in KINDS:
        rs = [r for r in results if r.kind == kind]
        by_kind[kind] = {"requests": len(rs), "ok": sum(r.ok for r in rs),
                         "p50_s": round(statistics.median([r.latency_s for r in rs]), 3) if rs else None,
                         "failures": [asdict(r) for r in rs if not r.ok][:5]}
    report.update(elapsed_s=round(elapsed, 1), requests_per_s=round(len(results) / elapsed, 2), by_kind=by_kind,
                  checks=checks, memory=memory, passed=passed, kv_stats_after=kv,
                  load_avg_1m_after=round(os.getloadavg()[0], 2))
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if passed else 1


def print_table(report: dict) -> None:
    print(f"\nsoak: {report['requests']} requests, {report['concurrency']} at a time, "
          f"{report['elapsed_s']} s ({report['requests_per_s']} req/s), load avg before {report['load_avg_1m_before']}")
    print(f"{'kind':<26}{'requests':>9}{'ok':>6}{'p50 s':>8}")
    for kind, row in report["by_kind"].items():
        print(f"{kind:<26}{row['requests']:>9}{row['ok']:>6}{row['p50_s'] if row['p50_s'] is not None else '-':>8}")
        for f in row["failures"]:
            print(f"    #{f['index']} status {f['status']}: {f['detail']}")
    for name, value in report["checks"].items():
        print(f"  {name}: {value}")
    m = report["memory"]
    print(f"  frontend RSS {m['frontend_rss_mb_before']} -> {m['frontend_rss_mb_after']} MB; "
          f"worker RSS {m['worker_rss_mb_before']} -> {m['worker_rss_mb_after']} MB")
    series = m["samples_s_frontend_worker"]
    if series:
        quarters = [series[min(len(series) - 1, round(q * (len(series) - 1)))] for q in (0, 0.25, 0.5, 0.75, 1)]
        print("  RSS during the run (s, frontend MB, worker MB): " + ", ".join(f"{q}" for q in quarters))
    print("PASSED" if report["passed"] else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
