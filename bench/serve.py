"""Serving benchmark: the engine benchmark's workload through TorchServe vs. the in-process engine.

    python bench/serve.py [--profile alpaca -n 200] [--profile2 sharegpt --scale2 0.5 -n2 64]
                          [--repeats 2] [--out bench/results/serve.json]

For each workload (bench/workload.py: token-id prompts, greedy, EOS ignored so output lengths
are fixed) and each repeat, interleaved:

- in-process: a fresh subprocess builds ``paged.LLMEngine`` on its main thread, adds every request
  at t0 and steps until done; TTFT / TPOT come from the engine's own per-request timestamps.
- served: a private TorchServe (free loopback ports, this repo's handler) gets every request at
  t0 from concurrent streaming clients (one asyncio client process, raw HTTP/1.1 chunked reads,
  no per-request threads); TTFT = first chunk with tokens - send time, TPOT = (last - first) /
  (tokens - 1), as a client sees them.

Where a served token's time goes: CPU seconds (utime + stime from /proc) of the in-process engine,
and while serving, of TorchServe's Java frontend, of the Python worker (split by thread group:
the engine thread with its OpenMP threads, the asyncio event loop that formats and frames the
stream, TorchServe's socket and other threads) and of the client; and backend messages (worker ->
frontend) per output token, from the worker's describe. The frontend's CPU is also split by JVM
thread (JIT compilers, GC/VM, Netty I/O, the model's worker threads). An untimed warm-up keeps
JIT compilation out of the timed runs: the first workload's requests, round after round, until a
round costs the frontend's JIT compiler threads under --warmup-jit-ms CPU ms per 1,000 tokens (at
most --warmup-rounds rounds): the figures are of a server in steady state. It also reads how
long the engine's threads (and the event loop) sat runnable waiting for a core, and how often they
were preempted (/proc schedstat and status), in process and served.

Same engine settings on both sides (fp32, block 16, prefix caching off, the same KV bytes,
max_num_seqs, max_num_batched_tokens). Prints a table and writes JSON. The machine has 2 cores
shared by TorchServe's Java frontend, the worker and the client: that overhead is part of what
is measured. Quote medians over repeats; the machine is noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
# Run from the repository root: bench/ (generic script names) off the import path, the root on it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))


def _load_workload_module():
    spec = importlib.util.spec_from_file_location("bench_workload", BENCH / "workload.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_workload"] = mod
    spec.loader.exec_module(mod)
    return mod


_wl = _load_workload_module()
from paged_tools import proc_cpu  # noqa: E402 - after the path set-up above
Workload, workload_for_model = _wl.Workload, _wl.workload_for_model


def engine_settings(args) -> dict:
    return {"block_size": 16, "kv_cache_memory_bytes": args.kv_bytes, "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens, "enable_prefix_caching": False,
            "dtype": "float32", "seed": 0, "max_waiting_requests": 100000, "preemption_mode": "auto",
            "fuse_decoder_layers": args.fuse_decoder_layers}


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def summarize(elapsed, ntoks, ttfts, tpots) -> dict:
    n = len(ntoks)
    return {"elapsed_s": round(elapsed, 3), "requests": n, "output_tokens": sum(ntoks),
            "requests_per_s": round(n / elapsed, 3), "output_tokens_per_s": round(sum(ntoks) / elapsed, 1),
            "ttft_p50_ms": _ms(pct(ttfts, 50)), "ttft_p99_ms": _ms(pct(ttfts, 99)),
            "tpot_p50_ms": _ms(pct(tpots, 50)), "tpot_p99_ms": _ms(pct(tpots, 99))}


def _ms(x):
    return None if x is None else round(x * 1000, 2)


# ------------------------------------------------------------------------------------ in-process
def inproc_worker(model: str, wl_path: str, settings: dict) -> None:
    """Runs in its own process: everything on the main thread (the one-torch-thread rule of docs/serving.md)."""
    from paged import EngineConfig, LLMEngine, SamplingParams

    wl = Workload.load(wl_path)
    eng = LLMEngine(EngineConfig(model=model, **settings))
    # warm-up on a few short requests
    for i in range(4):
        eng.add_request(f"w{i}", wl.prompts[i][:32], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    waits0 = _own_waits()
    cpu0 = _own_cpu_s()
    t0 = time.time()
    for i, (p, L) in enumerate(zip(wl.prompts, wl.output_lens)):
        eng.add_request(str(i), p, SamplingParams(max_tokens=L, temperature=0.0, ignore_eos=True), arrival_time=t0)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.time() - t0
    cpu = _own_cpu_s() - cpu0
    waits = _waits_delta(waits0, _own_waits())
    ntoks, ttfts, tpots = [], [], []
    for out in done.values():
        n = len(out.outputs[0].token_ids)
        ntoks.append(n)
        m = out.metrics
        if m.first_token_time:
            ttfts.append(m.first_token_time - t0)
            if n > 1 and m.finished_time:
                tpots.append((m.finished_time - m.first_token_time) / (n - 1))
    assert len(done) == wl.num_requests and ntoks and all(n == L for n, L in
                                                             zip([len(done[str(i)].outputs[0].token_ids) for i in range(wl.num_requests)], wl.output_lens))
    print(json.dumps(dict(summarize(elapsed, ntoks, ttfts, tpots), cpu={"engine_process_s": round(cpu, 3)},
                          waits=waits)))


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _own_waits() -> dict:
    return proc_cpu.grouped_thread_waits(os.getpid(), lambda tid: "engine")


def _waits_delta(before: dict, after: dict) -> dict:
    """Per thread group: seconds waiting for a core and preemptions between two readings."""
    out = {}
    for group, now in after.items():
        then = before.get(group, {"wait_s": 0.0, "preemptions": 0})
        out[group] = {"wait_s": round(now["wait_s"] - then["wait_s"], 4),
                      "preemptions": now["preemptions"] - then["preemptions"]}
    return out


def run_inproc(args, wl_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, __file__, "--inproc-worker", wl_path, "--model", args.model,
                        "--settings", json.dumps(engine_settings(args))],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ served
async def _one_stream(port: int, body: bytes, t0: float) -> tuple[int, float | None, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(b"POST /predictions/llm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read()
        raise RuntimeError(f"HTTP error: {status!r} {rest[-500:]!r}")
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    ntok, first, buf = 0, None, b""
    if not chunked:
        raise RuntimeError("expected a chunked streaming answer")
    while True:
        size_line = await reader.readline()
        size = int(size_line.strip().split(b";")[0], 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        buf += data[:-2]
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise RuntimeError(f"stream error: {obj}")
            k = sum(len(c["token_ids"]) for c in obj["choices"])
            if k and first is None:
                first = time.time()
            ntok += k
    end = time.time()
    writer.close()
    return ntok, first, end


async def _drive(port: int, wl: Workload) -> dict:
    bodies = [json.dumps({"prompt": p, "max_tokens": L, "temperature": 0.0, "ignore_eos": True,
                          "stream": True}).encode() for p, L in zip(wl.prompts, wl.output_lens)]
    t0 = time.time()
    res = await asyncio.gather(*[_one_stream(port, b, t0) for b in bodies])
    elapsed = max(r[2] for r in res) - t0
    ntoks = [r[0] for r in res]
    bad = [(i, n, L) for i, (n, L) in enumerate(zip(ntoks, wl.output_lens)) if n != L]
    if bad:
        raise RuntimeError(f"wrong output lengths (index, got, want): {bad[:5]}")
    ttfts = [r[1] - t0 for r in res if r[1]]
    tpots = [(r[2] - r[1]) / (r[0] - 1) for r in res if r[1] and r[0] > 1]
    return summarize(elapsed, ntoks, ttfts, tpots)


def client_worker(port: int, wl_path: str) -> None:
    wl = Workload.load(wl_path)
    cpu0 = _own_cpu_s()
    res = asyncio.run(_drive(port, wl))
    res["client_cpu_s"] = round(_own_cpu_s() - cpu0, 3)
    print(json.dumps(res))


# Worker threads by Python name -> where their CPU is reported. Threads Python does not know (no
# name) are the engine's OpenMP workers; named ones not listed are TorchServe's socket reader and
# writer threads, the tokenizer pool and the parent watchdog.
WORKER_THREAD_GROUPS = {"paged-engine": "engine", "MainThread": "event_loop"}


def frontend_thread_group(comm: str) -> str:
    """Where a thread of the Java frontend is reported, by the name the JVM gave it."""
    if comm.startswith(("C1 Compiler", "C2 Compiler")):
        return "jit"
    if comm.startswith(("GC Thread", "G1 ", "VM Thread", "VM Periodic")):
        return "gc_vm"
    if comm.startswith("epollEventLoop"):
        return "netty_io"
    if comm.startswith("W-"):
        return "workers"  # the model's worker threads and the readers of its stdout / stderr
    return "other"


def _frontend_thread_cpu_s(java: int | None) -> dict[str, float]:
    """CPU seconds of the Java frontend's live threads so far, per ``frontend_thread_group``."""
    if not java:
        return {}
    return proc_cpu.grouped_thread_cpu_s(java, lambda tid: frontend_thread_group(proc_cpu.thread_name(java, tid)))


def _served_counters(ts) -> dict:
    """CPU used so far by the frontend and per worker thread group, and backend messages written."""
    d = ts.describe()
    worker = d.get("worker", {})
    pid = worker.get("pid")
    names = {int(tid): name for tid, name in worker.get("threads", {}).items()}

    def group_of(tid: int) -> str:
        name = names.get(tid)
        return "engine" if name is None else WORKER_THREAD_GROUPS.get(name, "other_threads")

    java = ts.java_pid
    return {"frontend_s": proc_cpu.process_cpu_s(java) if java else None,
            "frontend_threads": _frontend_thread_cpu_s(java),
            "worker_s": proc_cpu.process_cpu_s(pid) if pid else None,
            "worker_threads": proc_cpu.grouped_thread_cpu_s(pid, group_of) if pid else {},
            "worker_waits": proc_cpu.grouped_thread_waits(pid, group_of) if pid else {},
            "backend": worker.get("backend", {})}


def run_served(ts, wl_path: str) -> dict:
    before = _served_counters(ts)
    r = subprocess.run([sys.executable, __file__, "--client-worker", wl_path, "--port", str(ts.http)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"client failed:\n{r.stderr[-3000:]}")
    after = _served_counters(ts)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["cpu"] = served_cpu_split(before, after, res.pop("client_cpu_s"))
    res["waits"] = _waits_delta(before["worker_waits"], after["worker_waits"])
    for key in ("messages", "bytes"):  # the describe between the counters adds one message: noise
        if key in before["backend"] and key in after["backend"]:
            res[f"backend_{key}"] = after["backend"][key] - before["backend"][key]
    return res


def served_cpu_split(before: dict, after: dict, client_s: float) -> dict:
    """CPU seconds per process (and per worker thread group) between two counter readings."""
    def delta(a, b):
        return None if a is None or b is None else round(b - a, 3)

    split = {"frontend_s": delta(before["frontend_s"], after["frontend_s"]),
             "worker_s": delta(before["worker_s"], after["worker_s"]), "client_s": client_s}
    for side in ("worker", "frontend"):
        b, a = before[f"{side}_threads"], after[f"{side}_threads"]
        for group in sorted(set(b) | set(a)):
            split[f"{side}_{group}_s"] = delta(b.get(group, 0.0), a.get(group, 0.0))
    return split


def start_server(args, work: Path):
    from paged_tools.ts_launcher import TorchServe, build_model_folder, free_ports

    ts = TorchServe(work, free_ports(5))
    ts.store.mkdir(parents=True, exist_ok=True)
    settings = dict(engine_settings(args), request_timeout=3000)
    if args.stream_interval != 1:  # else the handler's default
        settings["stream_interval"] = args.stream_interval
    build_model_folder(ts.store, "llm", Path(args.model).resolve(), settings)
    ts.env["OMP_NUM_THREADS"] = str(args.threads)
    ts.env["TOKENIZERS_PARALLELISM"] = "false"
    ts.start("llm=llm")
    ts.wait_ready("llm", timeout=900)
    return ts


def warm_served(ts, wl: Workload, max_tokens: int, max_rounds: int, settled_jit_ms: float) -> list[dict]:
    """Untimed traffic before the runs: every request of ``wl`` (at most ``max_tokens`` tokens each;
    0: as the workload has them), round after round, until a round costs the frontend's JIT
    compiler threads under ``settled_jit_ms`` CPU ms per 1,000 output tokens, or ``max_rounds``
    rounds. Returns each round's output tokens/s and JIT CPU ms per 1,000 tokens.

    The JVM keeps compiling the frontend's paths (Netty, the backend protocol, the metrics log
    parser) for thousands of requests: on SmolLM2-135M the JIT took 150-680 ms per Alpaca-like round
    of 11,598 tokens for the first 7 rounds, then 20-120 ms, while served throughput rose from
    753-805 to 782-825 tokens/s. Two short rounds left that compilation in the timed runs."""
    lens = wl.output_lens if max_tokens <= 0 else [min(L, max_tokens) for L in wl.output_lens]
    warm = Workload(name="warm", profile=wl.profile, scale=wl.scale, seed=wl.seed, vocab_size=wl.vocab_size,
                    prompts=list(wl.prompts), output_lens=list(lens))
    tokens = sum(lens)
    rounds = []
    for _ in range(max_rounds):
        before = _frontend_thread_cpu_s(ts.java_pid).get("jit")
        res = asyncio.run(_drive(ts.http, warm))
        after = _frontend_thread_cpu_s(ts.java_pid).get("jit")
        jit_ms = None if before is None or after is None else 1e6 * (after - before) / tokens
        rounds.append({"output_tokens_per_s": res["output_tokens_per_s"],
                       "frontend_jit_ms_per_1k_tokens": None if jit_ms is None else round(jit_ms, 1)})
        print(f"  warm-up round {len(rounds)}: {res['output_tokens_per_s']:.1f} out tok/s, frontend JIT "
              f"{_fmt(jit_ms)} CPU ms per 1,000 tokens", flush=True)
        if jit_ms is None or jit_ms < settled_jit_ms:
            break
    return rounds


# ------------------------------------------------------------------------------------ the split
def time_split(runs: dict[str, list]) -> dict:
    """Where a served token's time goes, medians over repeats: CPU ms per 1,000 output tokens per
    process (the worker's split by thread group), the cores kept busy, backend messages per token."""
    def per_k(r, seconds):
        return None if seconds is None else 1e6 * seconds / r["output_tokens"]

    def med(xs):
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 3) if xs else None

    out = {"inproc_cpu_ms_per_1k_tokens": med([per_k(r, r["cpu"]["engine_process_s"]) for r in runs["inproc"]])}
    served = runs["served"]
    keys = sorted({k for r in served for k in r["cpu"]})
    out["served_cpu_ms_per_1k_tokens"] = {k[:-2]: med([per_k(r, r["cpu"].get(k)) for r in served]) for k in keys}
    out["served_cores_busy"] = med([sum(v for k, v in r["cpu"].items() if k in ("frontend_s", "worker_s", "client_s")
                                        and v is not None) / r["elapsed_s"] for r in served])
    out["inproc_cores_busy"] = med([r["cpu"]["engine_process_s"] / r["elapsed_s"] for r in runs["inproc"]])
    for mode in ("inproc", "served"):
        for group in ("engine", "event_loop"):
            rs = [r for r in runs[mode] if group in r.get("waits", {})]
            if rs:
                out[f"{mode}_{group}_wait_ms_per_1k_tokens"] = med([per_k(r, r["waits"][group]["wait_s"]) for r in rs])
                out[f"{mode}_{group}_preemptions_per_1k_tokens"] = med(
                    [1000 * r["waits"][group]["preemptions"] / r["output_tokens"] for r in rs])
    out["backend_messages_per_token"] = med([r["backend_messages"] / r["output_tokens"] for r in served
                                             if "backend_messages" in r])
    out["backend_bytes_per_token"] = med([r["backend_bytes"] / r["output_tokens"] for r in served
                                          if "backend_bytes" in r])
    return out


def print_time_split(splits: dict[str, dict]) -> None:
    cols = ["worker_engine", "worker_event_loop", "worker_other_threads", "worker", "frontend", "client"]
    hdr = (f"{'workload':>16} {'in-proc':>8} | " + " ".join(f"{c.replace('worker_', 'w.'):>15}" for c in cols)
           + f" | {'cores in/srv':>12} {'msgs/tok':>8} {'bytes/tok':>9}")
    print("\nwhere a served token's time goes: CPU ms per 1,000 output tokens (medians; w. = the Python "
          "worker by thread group, w.engine includes its OpenMP threads; frontend = TorchServe's Java process; "
          "cores = CPU seconds per second of the run)")
    print(hdr)
    print("-" * len(hdr))
    for name, sp in splits.items():
        cpu = sp["served_cpu_ms_per_1k_tokens"]
        cells = " ".join(f"{_fmt(cpu.get(c)):>15}" for c in cols)
        cores = f"{_fmt(sp['inproc_cores_busy'], 2)}/{_fmt(sp['served_cores_busy'], 2)}"
        print(f"{name:>16} {_fmt(sp['inproc_cpu_ms_per_1k_tokens']):>8} | {cells} | {cores:>12} "
              f"{_fmt(sp['backend_messages_per_token'], 3):>8} {_fmt(sp['backend_bytes_per_token'], 0):>9}")
    print("waiting for a core (ms per 1,000 output tokens, summed over the group's threads; preempted: times per "
          "1,000 tokens): " + "; ".join(
              f"{name}: engine in process {_fmt(sp.get('inproc_engine_wait_ms_per_1k_tokens'))} "
              f"(preempted {_fmt(sp.get('inproc_engine_preemptions_per_1k_tokens'), 0)}), "
              f"served {_fmt(sp.get('served_engine_wait_ms_per_1k_tokens'))} "
              f"({_fmt(sp.get('served_engine_preemptions_per_1k_tokens'), 0)}), event loop "
              f"{_fmt(sp.get('served_event_loop_wait_ms_per_1k_tokens'))}"
              for name, sp in splits.items()))
    print("the frontend's share by JVM thread (CPU ms per 1,000 output tokens): "
          + "; ".join(f"{name}: " + ", ".join(f"{k[len('frontend_'):]} {_fmt(v)}" for k, v in
                                               sp["served_cpu_ms_per_1k_tokens"].items()
                                               if k.startswith("frontend_"))
                      for name, sp in splits.items()))


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "model-store" / "tiny-llama"))
    ap.add_argument("--mar", default=None, help="(unused: the benchmark serves the checkpoint as a model folder)")
    ap.add_argument("--workload", action="append", default=None,
                    help="PROFILE:N[:SCALE], repeatable; default alpaca:200 and sharegpt:64:0.5")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-bytes", type=int, default=1 << 30)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--warmup-tokens", type=int, default=0,
                    help="untimed warm-up: the first workload's requests with at most this many tokens each "
                         "(0: as many as the workload asks)")
    ap.add_argument("--warmup-rounds", type=int, default=16, help="untimed warm-up: at most this many rounds")
    ap.add_argument("--warmup-jit-ms", type=float, default=10.0,
                    help="untimed warm-up: stop after a round whose frontend JIT CPU per 1,000 tokens is below this")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the handler's stream_interval: a chunk every N generated tokens (default 1: every step)")
    ap.add_argument("--per-layer", dest="fuse_decoder_layers", action="store_false",
                    help="fuse_decoder_layers: false on both sides (one Python call per op, not one call per step)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve.json"))
    ap.add_argument("--inproc-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--client-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inproc_worker:
        return inproc_worker(args.model, args.inproc_worker, json.loads(args.settings))
    if args.client_worker:
        return client_worker(args.port, args.client_worker)

    specs = args.workload or ["alpaca:200", "sharegpt:64:0.5"]
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    wls = []
    for spec in specs:
        parts = spec.split(":")
        profile, n = parts[0], int(parts[1])
        scale = float(parts[2]) if len(parts) > 2 else 1.0
        wl = workload_for_model(args.model, profile, n, scale)
        path = work / f"{wl.name}-{n}.json"
        wl.save(str(path))
        wls.append((wl, str(path)))

    print(f"starting TorchServe in {work} (stream_interval {args.stream_interval}) ...", flush=True)
    ts = start_server(args, work)
    runs: dict[str, dict[str, list]] = {wl.name: {"inproc": [], "served": []} for wl, _ in wls}
    try:
        warmup = warm_served(ts, wls[0][0], args.warmup_tokens, args.warmup_rounds, args.warmup_jit_ms)
        for rep in range(args.repeats):
            for wl, path in wls:
                for mode in (("inproc", "served") if rep % 2 == 0 else ("served", "inproc")):
                    load_before = os.getloadavg()[0]
                    res = run_inproc(args, path) if mode == "inproc" else run_served(ts, path)
                    res["load_avg_1m_before"] = round(load_before, 2)  # > ~0.5 here: other work shared the cores
                    runs[wl.name][mode].append(res)
                    print(f"  rep {rep} {wl.name:>16} {mode:>7}: {res['output_tokens_per_s']:8.1f} out tok/s, "
                          f"TTFT p50 {res['ttft_p50_ms']} ms, TPOT p50 {res['tpot_p50_ms']} ms "
                          f"(load avg before {res['load_avg_1m_before']})", flush=True)
        describe = ts.describe()
    finally:
        ts.stop()

    table = []
    summary = {}
    for wl, _ in wls:
        row = {}
        for mode in ("inproc", "served"):
            rs = runs[wl.name][mode]
            med = {k: statistics.median([r[k] for r in rs if r[k] is not None])
                   for k in rs[0] if isinstance(rs[0][k], (int, float)) and any(r[k] is not None for r in rs)}
            row[mode] = med
        ratio = row["served"]["output_tokens_per_s"] / row["inproc"]["output_tokens_per_s"]
        summary[wl.name] = {"workload": wl.summary(), "inproc_median": row["inproc"], "served_median": row["served"],
                            "served_over_inproc_throughput": round(ratio, 3),
                            "where_time_goes": time_split(runs[wl.name]),
                            "runs": runs[wl.name]}
        table.append((wl.name, row, ratio))

    hdr = f"{'workload':>16} {'mode':>8} {'req/s':>8} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}"
    print("\n" + hdr)
    print("-" * len(hdr))
    for name, row, ratio in table:
        for mode in ("inproc", "served"):
            r = row[mode]
            print(f"{name:>16} {mode:>8} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:10.1f} "
                  f"{r.get('ttft_p50_ms', 0):9.1f} {r.get('ttft_p99_ms', 0):9.1f} "
                  f"{r.get('tpot_p50_ms', 0):9.2f} {r.get('tpot_p99_ms', 0):9.2f}")
        print(f"{'':>16} served/in-process throughput: {ratio:.1%} (target >= 90%)")
    print_time_split({name: summary[name]["where_time_goes"] for name, _, _ in table})
    out = {"settings": engine_settings(args), "stream_interval": args.stream_interval,
           "threads": args.threads, "repeats": args.repeats,
           "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
           "engine_thread_probe": describe.get("engine_thread_probe"), "warmup_rounds": warmup, "results": summary,
           "note": "medians over repeats; TTFT/TPOT in ms; served = TorchServe + handler + client on the same cores"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
