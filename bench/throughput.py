"""Offline throughput: our engine against HF static batching, HF continuous batching and vLLM CPU.

Every engine gets the same checkpoint, the same prompts (token ids), the same per-request output
lengths (EOS ignored), the same dtype (--dtype, fp32 by default), greedy decoding, prefix caching off, the same KV memory budget
(--kv-mib) and the same number of threads (--threads). Each engine runs in its own process
(bench/peers/<engine>.py) that loads the model (load_s, not counted), warms up, then runs every
workload once and reports wall time from first request in to last token out. Runs are
interleaved (repeat 1: every engine, repeat 2: every engine in a rotated order, ...) because the
machine is noisy; the table shows medians over --repeats, the ratio of our median output tokens/s
to each peer's, and the range of the per-repeat (paired) ratios.

HF static sweeps --hf-static-batch-sizes on the first repeat and reuses the best size per
workload afterwards. vLLM runs with .venv-vllm's interpreter (make venv-vllm); when it cannot be
found or fails, its row says "unavailable (<reason>)".

    python bench/throughput.py                       # both workloads, all engines, 3 repeats
    python bench/throughput.py --engines ours,hf_static --workloads alpaca:1:50 --repeats 1

Results: bench/results/throughput.json (everything, per run) and bench/results/throughput.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import analysis  # noqa: E402
from workload import single_request_workload, workload_for_model  # noqa: E402

ENGINES = ("ours", "hf_static", "hf_cb", "vllm", "vllm_eager")
LABELS = {"ours": "ours (paged)", "hf_static": "HF static", "hf_cb": "HF CB", "vllm": "vLLM CPU",
          "vllm_eager": "vLLM CPU --enforce-eager"}
SCRIPTS = {"ours": "ours.py", "hf_static": "hf_static.py", "hf_cb": "hf_cb.py", "vllm": "vllm_cpu.py",
           "vllm_eager": "vllm_cpu.py"}
VLLM_ENGINES = ("vllm", "vllm_eager")
TARGETS = {"hf_static": 4.0, "hf_cb": 2.5, "vllm": 1.25}
# Batch-1 decode time over its weight-streaming bound (weight bytes / DRAM read bandwidth): the target.
BOUND_RATIO_TARGET = 1.3
KV_UTIL_TARGET = 0.95
DEFAULT_WORKLOADS = "sharegpt:0.5:64,alpaca:1:200"
# A greedy sequence that differs from ours first differs where HF's top-2 logits are this close
# (fp32 GEMMs of different libraries and batch shapes round differently): a numerical near-tie.
NEAR_TIE_LOGIT_GAP = 1e-3


def parse_workloads(spec: str) -> list[tuple[str, float, int]]:
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise SystemExit(f"--workloads items are profile:scale:num_requests, got {item!r}")
        out.append((parts[0], float(parts[1]), int(parts[2])))
    return out


def isa_flags() -> list[str]:
    """The CPU's vector ISA extensions that decide the GEMM and attention paths (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma", "avx_vnni")))


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_busy_fraction(interval: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), or None off Linux."""
    def snap():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(max_wait_s: float, threshold: float) -> float | None:
    """Between runs nothing of ours is running: wait (bounded) until other processes leave the
    CPUs mostly idle, so a neighbour's burst does not land inside a measurement. Returns the
    busy fraction seen last."""
    deadline = time.time() + max_wait_s
    busy = cpu_busy_fraction()
    while busy is not None and busy > threshold and time.time() < deadline:
        busy = cpu_busy_fraction(2.0)
    return busy


def check_vllm(python: str) -> str | None:
    """None when vLLM can be imported by `python`, else the reason it cannot."""
    if not os.path.exists(python):
        return f"{python} not found (make venv-vllm creates it)"
    try:
        p = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                           capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "importing vllm took over 600 s"
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
        return f"import vllm failed: {lines[-1] if lines else 'exit ' + str(p.returncode)}"
    return None


def last_error_line(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "Exception" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_engine(engine: str, args, wl_paths: list[str], out_path: str, log_path: str,
               hf_sizes: dict[str, int] | None) -> tuple[dict | None, str | None]:
    py = args.vllm_python if engine in VLLM_ENGINES else sys.executable
    model = args.vllm_model if engine in VLLM_ENGINES and args.vllm_model else args.model
    cmd = [py, os.path.join(BENCH, "peers", SCRIPTS[engine]), "--model", model,
           "--workloads", *wl_paths, "--out", out_path, "--threads", str(args.threads),
           "--kv-bytes", str(args.kv_mib << 20), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", args.dtype]
    if engine == "ours" and args.quantization:
        cmd += ["--quantization", args.quantization]
    if engine not in VLLM_ENGINES or args.vllm_block_size:
        cmd += ["--block-size", str(args.vllm_block_size if engine in VLLM_ENGINES else args.block_size)]
    if engine == "vllm_eager":
        cmd += ["--enforce-eager"]
    if engine == "hf_static":
        cmd += ["--batch-sizes", args.hf_static_batch_sizes]
        for name, bs in (hf_sizes or {}).items():
            cmd += ["--batch-size-for", f"{name}={bs}"]
    if engine == "hf_cb":
        cmd += ["--attn", args.hf_cb_attn]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if engine in VLLM_ENGINES:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env.pop("PYTHONPATH")  # vLLM's venv must not see the project's packages
    if os.path.exists(out_path):
        os.remove(out_path)
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                               timeout=args.run_timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            return None, f"timed out after {args.run_timeout} s"
    if rc != 0 or not os.path.exists(out_path):
        return None, f"exit {rc}: {last_error_line(log_path)}"
    with open(out_path) as f:
        return json.load(f), None


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: dict[str, list[dict]], wl_names: list[str]) -> dict[str, Any]:
    """Per workload and engine: medians over repeats; ratios of ours to each peer."""
    summary: dict[str, Any] = {}
    for name in wl_names:
        rows: dict[str, Any] = {}
        for engine, rs in runs.items():
            recs = [r["results"][name] for r in rs if r and name in r.get("results", {})]
            if not recs:
                continue
            rows[engine] = {
                "repeats": len(recs),
                "output_tokens_per_s": med([x["output_tokens_per_s"] for x in recs]),
                "requests_per_s": med([x["requests_per_s"] for x in recs]),
                "total_tokens_per_s": med([x["total_tokens_per_s"] for x in recs]),
                "elapsed_s": med([x["elapsed_s"] for x in recs]),
                "mean_kv_utilization": med([x.get("mean_kv_utilization") for x in recs]),
                "load_s": med([r["load_s"] for r in rs if r]),
                "warmup_s": med([r["warmup_s"] for r in rs if r]),
                "all_output_tokens_per_s": [x["output_tokens_per_s"] for x in recs],
                "batch_size": recs[0].get("batch_size"),
                "sweep": recs[0].get("sweep"),
            }
        ours = rows.get("ours")
        if ours:
            for engine, row in rows.items():
                if engine == "ours":
                    continue
                row["ratio_ours_over"] = ours["output_tokens_per_s"] / row["output_tokens_per_s"]
                paired = [o["results"][name]["output_tokens_per_s"] / p["results"][name]["output_tokens_per_s"]
                          for o, p in zip(runs["ours"], runs[engine]) if o and p]
                row["paired_ratio_range"] = [min(paired), max(paired)] if paired else None
        summary[name] = rows
    return summary


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def render(summary: dict, unavailable: dict[str, str], engines: list[str], meta: dict) -> tuple[str, str]:
    """(plain table for the terminal, markdown for the README)."""
    head = ["workload", "engine", "req/s", "out tok/s", "KV util", "ours / peer", "paired range",
            "greedy = ours", "load s"]
    rows_out = []
    for name, rows in summary.items():
        for engine in engines:
            label = LABELS[engine]
            if engine in unavailable and engine not in rows:
                rows_out.append([name, label, "unavailable (see below)"] + [""] * 6)
                continue
            r = rows.get(engine)
            if r is None:
                continue
            if engine == "hf_static" and r.get("batch_size"):
                label += f" (batch {r['batch_size']})"
            util = r["mean_kv_utilization"]
            ratio = r.get("ratio_ours_over")
            pr = r.get("paired_ratio_range")
            rows_out.append([
                name, label, fmt(r["requests_per_s"], 2), fmt(r["output_tokens_per_s"]),
                "n/a" if util is None else f"{100 * util:.1f}%",
                "" if ratio is None else f"{ratio:.2f}x" + (
                    "" if engine not in TARGETS or name.startswith("batch1") else (" ok" if ratio >= TARGETS[engine] else
                                                      f" (< {TARGETS[engine]}x)")),
                "" if not pr else f"{pr[0]:.2f}-{pr[1]:.2f}",
                greedy_cell(r), fmt(r["load_s"], 0),
            ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows_out)] if rows_out else []
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    plain = "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows_out])
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows_out]
    notes = [
        "",
        f"Model `{meta['model']}`, {meta['dtype']}{' (ours: ' + meta['quantization'] + ' weights)' if meta.get('quantization') else ''}"
        f"{'; vLLM loads `' + meta['vllm_model'] + '`' if meta.get('vllm_model') else ''}, greedy, EOS ignored (fixed output lengths), prefix caching off, "
        f"KV budget {meta['kv_mib']} MiB for every engine ({meta['kv_tokens']:,} token slots at "
        f"{meta['kv_bytes_per_token']} B/token), {meta['threads']} threads each, {meta['repeats']} interleaved "
        f"repeats, medians. Throughput excludes model load / compile (`load s`) and warm-up. "
        f"ours / peer: ratio of median output tokens/s; paired range: min-max of per-repeat ratios. "
        f"KV util: live token slots / allocated slots, averaged over steps (n/a: the engine does not expose it). "
        f"greedy = ours: requests whose greedy tokens equal ours; a difference is a near-tie when HF's top-2 "
        f"logits at its first differing position are within {NEAR_TIE_LOGIT_GAP:g}. "
        f"Machine: {meta['cpu']}, {meta['nproc']} CPUs, load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end; {meta.get('disturbed_runs', 0)} run(s) started while other "
        f"processes kept > {meta.get('quiet_threshold', 0.25):.0%} of the CPUs busy. Command: `{meta['command']}`.",
    ]
    cfg = meta.get("ours_config") or {}
    if cfg:
        compiled = cfg.get("compile")
        compiled = compiled.get("active") if isinstance(compiled, dict) else compiled
        notes.append(f"\nOurs: GEMM path {cfg.get('linear_backend', 'n/a')}, torch.compile "
                     f"{compiled}, attention {cfg.get('attention', 'n/a')}, "
                     f"{cfg.get('threads')} threads, torch {cfg.get('torch')}.")
    b1 = meta.get("batch1")
    if b1:
        notes.append(f"\nBatch-1 decode bound on this machine: {b1['bound_tokens_per_s']:.0f} tokens/s "
                     f"({b1['decode_weight_bytes'] / 1e6:.0f} MB of weights read per token / "
                     f"{b1['dram_read_bytes_per_s'] / 1e9:.1f} GB/s measured DRAM read bandwidth)"
                     + (f"; ours decodes at {b1['ours_over_bound']:.2f}x that bound's time per token "
                        f"(target <= {BOUND_RATIO_TARGET})." if b1.get("ours_over_bound") else "."))
    if meta.get("chart"):
        notes.append(f"\nChart: `{meta['chart']}`.")
    notes += [f"\n{LABELS[e]}: unavailable ({why})" for e, why in unavailable.items()]
    return plain, "\n".join(md + notes) + "\n"


def analyse(summary: dict, runs: dict[str, list[dict | None]], wl_paths: list[str], wl_names: list[str],
            args, meta: dict) -> None:
    """Greedy agreement of every peer with ours (and whether disagreements are near-ties), ours'
    engine settings, and the memory-bandwidth bound of batch-1 decode."""
    from workload import Workload

    first_ours = next((r for r in runs.get("ours", []) if r), None)
    if first_ours:
        meta["ours_config"] = first_ours.get("config")
    checker = None
    if first_ours and not args.no_tie_check:
        checker = analysis.TieChecker(args.model, args.threads)
    for path, name in zip(wl_paths, wl_names):
        prompts = Workload.load(path).prompts
        rows = summary.get(name, {})
        if not first_ours or name not in first_ours["results"]:
            continue
        ours = first_ours["results"][name]["sample_outputs"]
        for engine, row in rows.items():
            first = next((r for r in runs[engine] if r and name in r["results"]), None)
            if engine == "ours" or first is None:
                continue
            row["greedy"] = analysis.compare_greedy(checker, prompts, ours, first["results"][name]["sample_outputs"],
                                                    NEAR_TIE_LOGIT_GAP)
    if args.batch1_tokens > 0:
        bandwidth = analysis.dram_read_bandwidth(args.threads)
        weights = analysis.decode_weight_bytes(args.model, args.dtype, args.quantization)
        meta["batch1"] = {"dram_read_bytes_per_s": bandwidth, "decode_weight_bytes": weights,
                          "bound_tokens_per_s": bandwidth / weights}
        batch1 = next((rows["ours"] for name, rows in summary.items() if name.startswith("batch1") and "ours" in rows),
                      None)
        if batch1:
            # time per token over the bound's time per token
            meta["batch1"]["ours_over_bound"] = meta["batch1"]["bound_tokens_per_s"] / batch1["output_tokens_per_s"]


def greedy_cell(row: dict) -> str:
    g = row.get("greedy")
    if not g:
        return ""
    cell = f"{g['compared'] - g['differing']}/{g['compared']}"
    if g["differing"]:
        cell += f" ({g['near_ties']} near-tie" + (f", {g['not_near_ties']} NOT" if g["not_near_ties"] else "") + ")"
    return cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "model-store", "tiny-llama"))
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS, help="profile:scale:num_requests,...")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="every engine's weights, activations and KV cache")
    ap.add_argument("--quantization", default=None, choices=("int8",),
                    help="ours only: weight-only int8 GEMMs (the peers stay at --dtype)")
    ap.add_argument("--vllm-model", default=None,
                    help="the checkpoint vLLM loads instead of --model: its W8A8 copy (bench/w8a8_checkpoint.py) "
                         "beside ours with --quantization int8")
    ap.add_argument("--kv-mib", type=int, default=256, help="KV cache budget for every engine (MiB)")
    ap.add_argument("--block-size", type=int, default=16, help="ours and HF CB page size")
    ap.add_argument("--vllm-block-size", type=int, default=0, help="0: vLLM's CPU default (128)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--hf-static-batch-sizes", default="32,64",
                    help="swept on the first repeat; the best per workload is reused")
    ap.add_argument("--hf-cb-attn", default="sdpa", help="HF CB attention: sdpa | paged|eager")
    ap.add_argument("--vllm-python", default=os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds per engine process")
    ap.add_argument("--wait-quiet", type=float, default=60.0,
                    help="before each run, wait up to this many seconds for other processes to "
                         "leave the CPUs idle (busy < --quiet-threshold); 0 disables")
    ap.add_argument("--quiet-threshold", type=float, default=0.25)
    ap.add_argument("--batch1-tokens", type=int, default=256,
                    help="also time one request decoding this many tokens (batch-1 decode); 0: skip")
    ap.add_argument("--no-tie-check", action="store_true",
                    help="skip checking greedy disagreements against HF logits for near-ties")
    ap.add_argument("--results-dir", default=os.path.join(BENCH, "results"))
    ap.add_argument("--name", default="throughput", help="output files: <results-dir>/<name>.json/.md")
    args = ap.parse_args()
    from tqdm import tqdm

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {ENGINES}")
    if not os.path.isdir(args.model):
        raise SystemExit(f"model dir {args.model} not found (make tiny-model builds the test model, make model the default one)")
    wl_dir = os.path.join(args.results_dir, "workloads")
    run_dir = os.path.join(args.results_dir, "runs", args.name)
    os.makedirs(wl_dir, exist_ok=True)
    os.makedirs(run_dir, exist_ok=True)

    wl_paths, wl_names, wl_summaries = [], [], []
    for profile, scale, n in parse_workloads(args.workloads):
        wl = workload_for_model(args.model, profile, n, scale, args.seed)
        wl.name = f"{wl.name}-n{n}"
        path = os.path.join(wl_dir, f"{wl.name}-seed{args.seed}.json")
        wl.save(path)
        wl_paths.append(path)
        wl_names.append(wl.name)
        wl_summaries.append(wl.summary())
        print(f"workload {wl.name}: {json.dumps(wl.summary())}", flush=True)
    if args.batch1_tokens > 0:
        wl = single_request_workload(args.model, output_len=args.batch1_tokens, seed=args.seed)
        path = os.path.join(wl_dir, f"{wl.name}-seed{args.seed}.json")
        wl.save(path)
        wl_paths.append(path)
        wl_names.append(wl.name)
        wl_summaries.append(wl.summary())

    unavailable: dict[str, str] = {}
    if any(e in VLLM_ENGINES for e in engines):
        reason = check_vllm(args.vllm_python)
        if reason:
            for engine in VLLM_ENGINES:
                if engine in engines:
                    unavailable[engine] = reason
            print(f"vLLM CPU: unavailable ({reason})", flush=True)

    sys.path.insert(0, os.path.join(BENCH, "peers"))
    import common
    per_tok = common.kv_bytes_per_token(args.model, args.dtype)
    meta = {"model": os.path.relpath(args.model, ROOT), "kv_mib": args.kv_mib,
            "kv_bytes_per_token": per_tok, "kv_tokens": (args.kv_mib << 20) // per_tok,
            "threads": args.threads, "repeats": args.repeats, "cpu": cpu_model(),
            "dtype": args.dtype, "quantization": args.quantization, "vllm_model": args.vllm_model, "isa": isa_flags(),
            "nproc": os.cpu_count(), "loadavg_start": load_avg(),
            "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                 else "python", os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "quiet_threshold": args.quiet_threshold}

    active = [e for e in engines if e not in unavailable]
    runs: dict[str, list[dict | None]] = {e: [] for e in active}
    errors: dict[str, list[str]] = {e: [] for e in active}
    hf_sizes: dict[str, int] | None = None
    busy_before: dict[str, list[float | None]] = {}
    t_start = time.perf_counter()
    bar = tqdm(total=args.repeats * len(active), desc="bench runs", unit="run")
    for rep in range(args.repeats):
        order = active[rep % len(active):] + active[:rep % len(active)] if active else []
        for engine in order:
            busy = None
            if args.wait_quiet > 0:
                bar.set_postfix_str(f"repeat {rep + 1}: {engine} (waiting for idle CPUs)")
                busy = wait_for_quiet(args.wait_quiet, args.quiet_threshold)
                if busy is not None and busy > args.quiet_threshold:
                    tqdm.write(f"  note: other processes keep {busy:.0%} of the CPUs busy; "
                               f"{engine} repeat {rep + 1} figures are disturbed")
                busy_before.setdefault(engine, []).append(busy)
            bar.set_postfix_str(f"repeat {rep + 1}: {engine}")
            out = os.path.join(run_dir, f"{engine}-r{rep + 1}.json")
            log = os.path.join(run_dir, f"{engine}-r{rep + 1}.log")
            res, err = run_engine(engine, args, wl_paths, out, log, hf_sizes if engine == "hf_static" else None)
            if err:
                errors[engine].append(f"repeat {rep + 1}: {err} (log: {os.path.relpath(log, ROOT)})")
                tqdm.write(f"{engine} repeat {rep + 1} failed: {err}")
            else:
                for name in wl_names:
                    r = res["results"][name]
                    tqdm.write(f"  r{rep + 1} {engine:9s} {name}: {r['output_tokens_per_s']:8.1f} out tok/s "
                               f"({r['elapsed_s']:.1f} s)  load {res['load_s']:.1f} s")
                if engine == "hf_static" and hf_sizes is None:
                    hf_sizes = {name: res["results"][name]["batch_size"] for name in wl_names}
            runs[engine].append(res)
            bar.update(1)
    bar.close()
    for engine, errs in errors.items():
        if errs and not any(runs[engine]):
            unavailable[engine] = errs[0]
    meta["loadavg_end"] = load_avg()
    meta["others_cpu_busy_before_runs"] = busy_before
    noisy = [b for bs in busy_before.values() for b in bs if b is not None and b > args.quiet_threshold]
    meta["disturbed_runs"] = len(noisy)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)

    # Align repeats for paired ratios (a failed run is None in its slot).
    summary = aggregate(runs, wl_names)
    print("checking greedy agreement and measuring the batch-1 bound ...", flush=True)
    analyse(summary, runs, wl_paths, wl_names, args, meta)
    chart = analysis.bar_chart(summary, LABELS, engines, os.path.join(args.results_dir, f"{args.name}.png"),
                               f"{meta['cpu']}, {args.threads} threads, {args.repeats} repeats (medians)")
    meta["chart"] = os.path.relpath(chart, ROOT) if chart else None
    plain, md = render(summary, unavailable, engines, meta)
    print()
    print(plain)
    checks = []
    for name, rows in summary.items():
        ours = rows.get("ours")
        if not ours or name.startswith("batch1"):
            continue  # batch-1 decode is compared with the bandwidth bound, not given a target
        for engine, target in TARGETS.items():
            r = rows.get(engine)
            if r and r.get("ratio_ours_over") is not None:
                checks.append({"workload": name, "check": f"ours >= {target}x {LABELS[engine]}",
                               "value": round(r["ratio_ours_over"], 3), "pass": r["ratio_ours_over"] >= target})
        u = ours.get("mean_kv_utilization")
        if u is not None:
            checks.append({"workload": name, "check": f"our KV utilization >= {KV_UTIL_TARGET:.0%}",
                           "value": round(u, 4), "pass": u >= KV_UTIL_TARGET})
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['workload']}: {c['check']} (got {c['value']})")
    for engine, reason in unavailable.items():
        print(f"{LABELS[engine]}: unavailable ({reason})")
    for engine, errs in errors.items():
        for e in errs:
            print(f"{LABELS[engine]} error: {e}")

    os.makedirs(args.results_dir, exist_ok=True)
    out_json = os.path.join(args.results_dir, f"{args.name}.json")
    with open(out_json, "w") as f:
        json.dump({"meta": meta, "args": vars(args), "workloads": wl_summaries, "summary": summary,
                   "checks": checks, "unavailable": unavailable, "errors": errors,
                   "runs": {e: [None if r is None else {k: v for k, v in r.items()} for r in rs]
                            for e, rs in runs.items()}}, f, indent=1)
    out_md = os.path.join(args.results_dir, f"{args.name}.md")
    with open(out_md, "w") as f:
        f.write(md)
    print(f"\nwrote {os.path.relpath(out_json, ROOT)} and {os.path.relpath(out_md, ROOT)} "
          f"({meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
