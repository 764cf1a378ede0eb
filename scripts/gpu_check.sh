#!/usr/bin/env bash
# GPU check for a lent GPU machine (no internet; torch and nvidia-ml-py installed there, not this
# repo's venv). Runs, under one global time budget (GPU_CHECK_BUDGET_S, default 330 s: inside the
# 6 minutes a check may take and the device tool's 600 s per command):
#   1. the `gpu`-marked tests (replay, doctor, NVML, record),
#   2. `moeprof doctor` (driver, CUDA, PCIe link, NVML counters, pinned host->device peak),
#   3. replays of a synthetic trace on the GPU: naive, dedup and lru at batch sizes 8 and 64
#      (plus a short --compute run and, when typer/safetensors exist, the same through the CLI),
#   4. benchmarks/bench_replay.py (GB/s vs peak, NVML RX vs counted, time vs byte ratio),
# and ends with a summary table (also written to $OUT/summary.txt), whatever failed. Each step
# runs under min(its own limit, the budget left); a step with under 15 s left is recorded as
# "SKIPPED (budget)". Everything is written under $OUT (default ./gpu-check-out). Exit status:
# 0 when every step that ran passed, 1 otherwise (the summary is printed either way).
#
#   bash scripts/gpu_check.sh     # PYTHON=/path/to/python chooses the interpreter;
#                                 # GPU_CHECK_BUDGET_S=N changes the budget
set -uo pipefail

CALLER_PWD="$PWD"
cd "$(dirname "$0")/.." || exit 1
REPO="$PWD"
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$CALLER_PWD/$1" ;; esac; }

BUDGET_S="${GPU_CHECK_BUDGET_S:-330}"
case "$BUDGET_S" in
  '' | *[!0-9]*)
    echo "gpu_check: GPU_CHECK_BUDGET_S must be whole seconds, got '$BUDGET_S'" >&2
    exit 2
    ;;
esac
T_START=$(date +%s)
DEADLINE=$((T_START + BUDGET_S))
KILL_AFTER=5  # seconds from the INT at a step's limit to a KILL
MIN_STEP_S=15 # a step with less budget than this left is skipped

OUT_DIR="$(abspath "${OUT:-$REPO/gpu-check-out}")"
mkdir -p "$OUT_DIR" || exit 1
# Outputs of an earlier check would be summarised as this one's.
rm -f "$OUT_DIR"/summary.txt "$OUT_DIR"/modules.txt "$OUT_DIR"/replay*.json "$OUT_DIR"/replay*.md \
  "$OUT_DIR"/bench.json "$OUT_DIR"/doctor.json "$OUT_DIR"/gpu-tests.xml "$OUT_DIR"/demo.moe

# Everything also goes to the log; at the end the tee is waited for (bounded), so the log's
# tail is on disk when the script returns.
exec 3>&1 4>&2
exec > >(tee "$OUT_DIR/gpu_check.log" >&3) 2>&1
TEE_PID=$!
finish() {
  local rc="${1:-0}" i
  exec 1>&3 2>&4 # drop our ends of the pipe: tee ends once no step holds it either
  for i in $(seq 1 50); do
    kill -0 "$TEE_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$TEE_PID" 2>/dev/null || wait "$TEE_PID" 2>/dev/null
  exec 3>&- 4>&-
  exit "$rc"
}

# Whatever python has torch (PYTHON= first); the repo is used in place through PYTHONPATH.
PY=""
for cand in "${PYTHON:-}" python3 python /usr/bin/python3 /opt/conda/bin/python; do
  [ -n "$cand" ] || continue
  case "$cand" in */*) cand="$(abspath "$cand")" ;; esac
  if command -v "$cand" >/dev/null 2>&1 && timeout 60 "$cand" -c "import torch" 2>/dev/null; then
    PY="$(command -v "$cand")"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python with torch found (set PYTHON=...)" >&2
  finish 1
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# No internet there: transformers must not wait on hub retries.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MOEPROF_GPU_CHECK_OUT="$OUT_DIR"

STEPS=()
FAILED=0
record() { STEPS+=("$(printf '%-34s %-22s %5ss' "$1" "$2" "$3")"); }
step() { # step NAME LIMIT_S COMMAND...: runs under min(LIMIT_S, the budget left)
  local name="$1" own="$2"
  shift 2
  local left limit t0 rc dt status
  left=$((DEADLINE - $(date +%s) - KILL_AFTER))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    echo
    echo "=== $name: SKIPPED (budget: ${left}s left of ${BUDGET_S}s) ==="
    record "$name" "SKIPPED (budget)" 0
    return 0
  fi
  limit="$own"
  [ "$left" -lt "$limit" ] && limit="$left"
  echo
  echo "=== $name (limit ${limit}s; ${left}s of the budget left) ==="
  t0=$(date +%s)
  timeout --signal=INT --kill-after="$KILL_AFTER" "$limit" "$@"
  rc=$?
  dt=$(($(date +%s) - t0))
  status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)" && FAILED=$((FAILED + 1))
  [ "$rc" -eq 124 ] && status="TIMED OUT (${limit}s)"
  [ "$rc" -eq 137 ] && status="KILLED (${limit}s+)"
  record "$name" "$status" "$dt"
}

echo "=== environment (budget ${BUDGET_S}s) ==="
timeout 60 "$PY" - <<'EOF'
import importlib, os, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
import torch
print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
present = ["torch"] + (["cuda"] if torch.cuda.is_available() else [])
for name in ("numpy", "pynvml", "typer", "rich", "safetensors", "pytest", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:12s} {getattr(mod, '__version__', 'present')}")
        present.append(name)
    except Exception as exc:  # ImportError, or a broken install
        print(f"  {name:12s} MISSING ({type(exc).__name__})")
numpy = sys.modules.get("numpy")
if numpy is not None and int(numpy.__version__.split(".")[0]) < 2:
    print(f"gpu_check: WARNING: numpy {numpy.__version__} < 2.0 (moeprof requires 2.0; bit "
          "counting falls back to a byte table, other differences may fail)")
with open(os.path.join(os.environ["MOEPROF_GPU_CHECK_OUT"], "modules.txt"), "w") as fh:
    fh.write("\n".join(present) + "\n")
EOF
has() { grep -qx "$1" "$OUT_DIR/modules.txt" 2>/dev/null; }
if ! has cuda; then
  echo "gpu_check: WARNING: torch sees no CUDA device here; the GPU steps will fail or skip"
fi

if has pytest; then
  GPU_TESTS=(tests/test_replay_engine.py tests/test_replay_backends.py tests/test_cudart.py tests/test_doctor.py tests/test_nvml.py tests/test_record.py)
  # The record CLI tests run moeprof.cli (typer, rich); both record files skip without
  # transformers.
  if has typer && has rich; then GPU_TESTS+=(tests/test_record_cli.py); fi
  step "gpu tests" 90 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" \
    --junitxml="$OUT_DIR/gpu-tests.xml"
else
  record "gpu tests" "SKIPPED (no pytest)" 0
fi

if has typer && has rich; then
  step "moeprof doctor" 40 "$PY" -m moeprof doctor --json "$OUT_DIR/doctor.json" --force
else
  step "doctor (library)" 40 "$PY" -c "
import json, os
from moeprof.replay.doctor import gather
doc = gather().to_dict()
print(json.dumps(doc, indent=2))
open(os.path.join(os.environ['MOEPROF_GPU_CHECK_OUT'], 'doctor.json'), 'w').write(json.dumps(doc, indent=2))
"
fi

# Library path: needs only torch, numpy (and pynvml for PCIe bytes).
step "replay naive/dedup/lru B=8,64" 90 "$PY" - <<'EOF'
import json, os, time
import moeprof
from moeprof.replay import replay
from moeprof.report.markdown import replay_markdown

out = os.environ["MOEPROF_GPU_CHECK_OUT"]
trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=4, n_requests=16,
                           tokens_per_request=64, zipf=0.8, locality=0.3, seed=0)
t0 = time.perf_counter()
doc = replay(trace, device="cuda", strategies=("naive", "dedup", "lru"), batch_sizes=[8, 64],
             cache_experts=4, expert_bytes=16 << 20,
             on_progress=lambda label, done, total: None).to_dict()
print(f"replayed in {time.perf_counter() - t0:.1f} s")
with open(os.path.join(out, "replay.json"), "w") as fh:
    json.dump(doc, fh, indent=2)
with open(os.path.join(out, "replay.md"), "w") as fh:
    fh.write(replay_markdown(doc))
print(replay_markdown(doc))
EOF

step "replay --compute (20 batches)" 50 "$PY" - <<'EOF'
import json, os
import moeprof
from moeprof.replay import replay
from moeprof.report.markdown import replay_markdown

out = os.environ["MOEPROF_GPU_CHECK_OUT"]
trace = moeprof.synthesize(n_experts=8, top_k=2, n_layers=4, n_requests=16,
                           tokens_per_request=64, zipf=0.8, locality=0.3, seed=0)
# 3 x 4096 x 1024 bf16 = 24 MiB per expert: a quarter-width Mixtral expert.
doc = replay(trace, device="cuda", batch_sizes=[8, 64], cache_experts=4, max_batches=20,
             expert_bytes=3 * 4096 * 1024 * 2, compute=True, hidden_size=4096).to_dict()
with open(os.path.join(out, "replay-compute.json"), "w") as fh:
    json.dump(doc, fh, indent=2)
print(replay_markdown(doc))
EOF

if has typer && has rich && has safetensors; then
  step "moeprof synth + replay (CLI)" 50 bash -c "
    '$PY' -m moeprof synth -o '$OUT_DIR/demo.moe' --experts 8 --top-k 2 --layers 4 \
      --requests 16 --tokens 64 --zipf 0.8 --locality 0.3 --force &&
    '$PY' -m moeprof replay '$OUT_DIR/demo.moe' --device cuda --strategies naive,dedup,lru \
      --batch-sizes 8,64 --cache-experts 4 --expert-bytes 4194304 \
      --json '$OUT_DIR/replay-cli.json' --markdown '$OUT_DIR/replay-cli.md' --force"
else
  record "CLI replay" "SKIPPED (no typer/rich/safetensors)" 0
fi

step "bench_replay" 60 "$PY" benchmarks/bench_replay.py --json "$OUT_DIR/bench.json"

{
  echo
  echo "=== summary ==="
  printf '%-34s %-22s %6s\n' "step" "status" "time"
  for line in "${STEPS[@]}"; do echo "$line"; done
  echo "total $(($(date +%s) - T_START))s of a ${BUDGET_S}s budget; steps failed: $FAILED"
  echo
  timeout 20 "$PY" - <<'EOF'
import json, os
out = os.environ["MOEPROF_GPU_CHECK_OUT"]
path = os.path.join(out, "replay.json")
if not os.path.exists(path):
    print("no replay results")
else:
    doc = json.load(open(path))
    info = doc["replay"]
    peak = info.get("peak_h2d_gbps")
    print(f"device {info.get('device_name')} ({info['device']}), peak "
          f"{'-' if peak is None else f'{peak:.2f}'} GB/s, PCIe measurement "
          f"{info['measurement_method']}, blocks {info['expert_bytes_replayed'][0] >> 20} MiB, "
          f"host memory: {info.get('host_memory')}")
    if info.get("measurement_reason"):
        print(f"  ({info['measurement_reason']})")
    for note in info.get("measurement_notes") or []:
        print(f"  note: {note}")
    check = info.get("counter_check")
    if check:
        print(f"  NVML counter check on the calibration: copied {check['bytes_copied']:,} B, "
              f"RX {check['nvml_rx_bytes']} B, ratio {check['rx_to_copied']}")
    head = (f"{'batch':>5} {'strategy':>8} {'copies':>7} {'GiB':>8} {'seconds':>8} {'GB/s':>7} "
            f"{'%peak':>6} {'RX/cnt':>7} {'counted':>8} {'measured':>9} {'agree':>5} "
            f"{'issue s':>8}")
    print(head)
    print("-" * len(head))
    for row in doc["results"]:
        for s in row["replay"]["strategies"]:
            v = s["vs_naive"]
            rx = s["measured_to_counted"]
            cnt = v["counted_savings"]
            meas = (v["measured_savings_nvml"] if v["basis"] == "nvml_rx_bytes"
                    else v["measured_savings_seconds"])
            agree = v["agrees_within_10pct"]
            print(f"{row['batch_size']:>5} {s['strategy']:>8} {s['copies']:>7} "
                  f"{s['bytes_copied'] / 2**30:>8.2f} {s['seconds']:>8.3f} {s['gbps']:>7.2f} "
                  f"{100 * (s['share_of_peak'] or 0):>5.1f}% "
                  f"{'-' if rx is None else f'{rx:.3f}':>7} "
                  f"{'-' if cnt is None else f'{100 * cnt:.1f}%':>8} "
                  f"{'-' if meas is None else f'{100 * meas:.1f}%':>9} "
                  f"{'-' if agree is None else ('yes' if agree else 'no'):>5} "
                  f"{s.get('issue_seconds') or 0:>8.3f}"
                  + (" HOST-BOUND" if s.get("host_bound") else ""))
    print("\nNVML raw reads per run (RX/cnt is informational until the counter's basis is known):")
    for row in doc["results"]:
        for s in row["replay"]["strategies"]:
            raw = s.get("nvml_raw") or {}
            first, last = raw.get("first") or {}, raw.get("last") or {}
            if "rx_bytes" in first:
                what = (f"RX {first['rx_bytes']} -> {last.get('rx_bytes')}, "
                        f"TX {first['tx_bytes']} -> {last.get('tx_bytes')} "
                        f"({first.get('counter_bits')}-bit, value type {first.get('value_type')}, "
                        f"NVML ts {first.get('rx_nvml_timestamp_us')} -> "
                        f"{last.get('rx_nvml_timestamp_us')} us)")
            elif "rx_kib_s" in first:
                what = f"RX {first['rx_kib_s']} -> {last.get('rx_kib_s')} KB/s"
            else:
                what = "no reads"
            print(f"  B={row['batch_size']} {s['strategy']}: {what}; {raw.get('samples')} "
                  f"samples, max gap {raw.get('max_sample_gap_seconds')} s, settle "
                  f"{raw.get('settle_start_seconds')}/{raw.get('settle_stop_seconds')} s "
                  f"(settled {raw.get('settled')}), wrap32 {raw.get('wrap32_fixes')}, "
                  f"backwards {raw.get('anomalies')}"
                  + (f"; {s['nvml_reason']}" if s.get("nvml_reason") else ""))
path = os.path.join(out, "replay-compute.json")
if os.path.exists(path):
    doc = json.load(open(path))
    print("\n--compute per-batch latency (critical path: the sum must not exceed the run):")
    for row in doc["results"]:
        for s in row["replay"]["strategies"]:
            lat = s.get("batch_latency") or {}
            total = lat.get("mean_ms", 0) * lat.get("batches", 0) / 1e3
            verdict = "ok" if total <= s["seconds"] * (1 + 1e-6) else "EXCEEDS THE RUN"
            print(f"  B={row['batch_size']} {s['strategy']}: run {s['seconds']:.4f} s, "
                  f"{lat.get('batches')} batches, mean {lat.get('mean_ms', 0):.3f} ms, "
                  f"p90 {lat.get('p90_ms', 0):.3f} ms, sum {total:.4f} s ({verdict})")
EOF
  echo
  echo "outputs: $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
finish $((FAILED > 0 ? 1 : 0))
