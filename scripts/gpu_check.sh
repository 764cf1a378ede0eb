#!/usr/bin/env bash
# GPU check for a lent GPU machine (no internet; torch and nvidia-ml-py installed there, not this
# repo's venv). Runs, each under its own time limit, in <= 6 minutes in all:
#   1. the `gpu`-marked tests (replay, doctor, NVML),
#   2. `moeprof doctor` (driver, CUDA, PCIe link, NVML counters, pinned host->device peak),
#   3. replays of a synthetic trace on the GPU: naive, dedup and lru at batch sizes 8 and 64
#      (plus a short --compute run and, when typer/safetensors exist, the same through the CLI),
#   4. benchmarks/bench_replay.py (GB/s vs peak, NVML RX vs counted, time vs byte ratio),
# and ends with a summary table. Everything is written under $OUT (default ./gpu-check-out).
#
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
REPO="$PWD"
OUT_DIR="${OUT:-$REPO/gpu-check-out}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

# Whatever python has torch; the repo is used in place through PYTHONPATH (nothing installed).
PY=""
for cand in "${PYTHON:-}" python3 python /usr/bin/python3 /opt/conda/bin/python; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" 2>/dev/null; then
    PY="$(command -v "$cand")"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python with torch found (set PYTHON=...)" >&2
  exit 1
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MOEPROF_GPU_CHECK_OUT="$OUT_DIR"

STEPS=()
step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== $name (limit ${limit}s) ==="
  local t0 rc
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status="ok"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="TIMED OUT"
  STEPS+=("$(printf '%-34s %-18s %5ss' "$name" "$status" "$dt")")
}

echo "=== environment ==="
"$PY" - <<'EOF'
import importlib, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
import torch
print(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for name in ("numpy", "pynvml", "typer", "rich", "safetensors", "pytest", "transformers"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:12s} {getattr(mod, '__version__', 'present')}")
    except ImportError:
        print(f"  {name:12s} MISSING")
EOF
has() { "$PY" -c "import $1" 2>/dev/null; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: WARNING: torch sees no CUDA device here; the GPU steps will fail or skip"
fi

if has pytest; then
  step "gpu tests" 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_replay.py tests/test_doctor.py tests/test_nvml.py \
    --junitxml="$OUT_DIR/gpu-tests.xml"
else
  STEPS+=("$(printf '%-34s %-18s %5ss' "gpu tests" "SKIPPED (no pytest)" 0)")
fi

if has typer && has rich; then
  step "moeprof doctor" 60 "$PY" -m moeprof doctor --json "$OUT_DIR/doctor.json" --force
else
  step "doctor (library)" 60 "$PY" -c "
import json, os
from moeprof.replay.doctor import gather
doc = gather().to_dict()
print(json.dumps(doc, indent=2))
open(os.path.join(os.environ['MOEPROF_GPU_CHECK_OUT'], 'doctor.json'), 'w').write(json.dumps(doc, indent=2))
"
fi

# Library path: needs only torch, numpy (and pynvml for PCIe bytes).
step "replay naive/dedup/lru B=8,64" 150 "$PY" - <<'EOF'
import json, os, time
import moeprof
from moeprof.replay import replay
from moeprof.report.replay import replay_markdown

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

step "replay --compute (20 batches)" 90 "$PY" - <<'EOF'
import json, os
import moeprof
from moeprof.replay import replay
from moeprof.report.replay import replay_markdown

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
  step "moeprof synth + replay (CLI)" 90 bash -c "
    '$PY' -m moeprof synth -o '$OUT_DIR/demo.moe' --experts 8 --top-k 2 --layers 4 \
      --requests 16 --tokens 64 --zipf 0.8 --locality 0.3 --force &&
    '$PY' -m moeprof replay '$OUT_DIR/demo.moe' --device cuda --strategies naive,dedup,lru \
      --batch-sizes 8,64 --cache-experts 4 --expert-bytes 4194304 \
      --json '$OUT_DIR/replay-cli.json' --markdown '$OUT_DIR/replay-cli.md' --force"
else
  STEPS+=("$(printf '%-34s %-18s %5ss' "CLI replay" "SKIPPED (no typer/rich/safetensors)" 0)")
fi

step "bench_replay" 120 "$PY" benchmarks/bench_replay.py --json "$OUT_DIR/bench.json"

echo
echo "=== summary ==="
printf '%-34s %-18s %6s\n' "step" "status" "time"
for line in "${STEPS[@]}"; do echo "$line"; done
echo
"$PY" - <<'EOF'
import json, os
path = os.path.join(os.environ["MOEPROF_GPU_CHECK_OUT"], "replay.json")
if not os.path.exists(path):
    print("no replay results")
    raise SystemExit(0)
doc = json.load(open(path))
info = doc["replay"]
print(f"device {info.get('device_name')} ({info['device']}), peak {info['peak_h2d_gbps']:.2f} GB/s, "
      f"PCIe measurement {info['measurement_method']}, blocks {info['expert_bytes_replayed'][0] >> 20} MiB")
head = (f"{'batch':>5} {'strategy':>8} {'copies':>7} {'GiB':>8} {'seconds':>8} {'GB/s':>7} "
        f"{'%peak':>6} {'RX/cnt':>7} {'counted':>8} {'measured':>9} {'agree':>5}")
print(head)
print("-" * len(head))
for row in doc["results"]:
    for s in row["replay"]["strategies"]:
        v = s["vs_naive"]
        rx = s["measured_to_counted"]
        cnt = v["counted_savings"]
        meas = v["measured_savings_nvml"] if v["basis"] == "nvml_rx_bytes" else v["measured_savings_seconds"]
        agree = v["agrees_within_10pct"]
        print(f"{row['batch_size']:>5} {s['strategy']:>8} {s['copies']:>7} "
              f"{s['bytes_copied'] / 2**30:>8.2f} {s['seconds']:>8.3f} {s['gbps']:>7.2f} "
              f"{100 * (s['share_of_peak'] or 0):>5.1f}% {'-' if rx is None else f'{rx:.3f}':>7} "
              f"{'-' if cnt is None else f'{100 * cnt:.1f}%':>8} "
              f"{'-' if meas is None else f'{100 * meas:.1f}%':>9} "
              f"{'-' if agree is None else ('yes' if agree else 'no'):>5}")
EOF
echo
echo "outputs: $OUT_DIR"
