#!/usr/bin/env bash
# Run the moeprof command line on a corpus of mutated inputs and count the outcomes:
# clean error (exit 2, one "moeprof: error:" line), accepted (exit 0), traceback, signal, hang.
# The corpus: tests/data/robustness/ plus N mutations (bit flips, truncation, insertions) of a
# valid trace, JSONL and CSV file, made from a fixed seed. Each case runs in its own process,
# so a segfault or a hang is counted, not fatal. docs/import.md "Robustness" shows a run.
#
# usage: scripts/fuzz.sh [N] [SEED]        (default: N=100 per kind, SEED=0)
set -u
cd "$(dirname "$0")/.."
N=${1:-100}
SEED=${2:-0}
PY=${PYTHON:-.venv/bin/python}
LIMIT=${FUZZ_TIMEOUT:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" - "$work" "$N" "$SEED" <<'EOF'
import json, random, sys
from pathlib import Path
import moeprof

out, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
moeprof.synthesize(n_experts=8, top_k=2, n_layers=2, n_requests=3, tokens_per_request=5).save(
    out / "base.moe"
)
bases = {
    "moe": (out / "base.moe").read_bytes(),
    "jsonl": "".join(
        json.dumps({"req_id": r, "token_idx": t, "layer": l, "topk_ids": [t % 4, 4 + l]}) + "\n"
        for r in range(2) for t in range(3) for l in range(2)
    ).encode(),
    "csv": b"request_id,position,layer,experts\n" + b"".join(
        f'{r},{t},{l},"{t % 4} {4 + l}"\n'.encode() for r in range(2) for t in range(3)
        for l in range(2)
    ),
}
inserts = [b"null", b"[" * 300, b"{}", b"\xff", b"\xef\xbb\xbf", b'"', b",", b"\n", b"-1",
           b"1e400", b"99999999999999999999999", b"NaN", b"\x00"]
for kind, base in bases.items():
    for i in range(n):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(max(len(data), 1))
            op = rng.choice(["flip", "truncate", "insert", "delete"])
            if op == "flip" and data:
                data[at] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                del data[at:]
            elif op == "insert":
                data[at:at] = rng.choice(inserts)
            else:
                del data[at : at + rng.randint(1, 16)]
        (out / f"case{i:05d}.{kind}").write_bytes(bytes(data))
EOF

declare -A count=([cases]=0 [clean]=0 [accepted]=0 [traceback]=0 [signal]=0 [hang]=0 [other]=0)
run_case() {  # $1: input file; the rest: the command
  local input=$1; shift
  rm -f "$work/out.moe"
  timeout "$LIMIT" "$PY" -m moeprof "$@" >/dev/null 2>"$work/err"
  local rc=$?
  count[cases]=$((count[cases] + 1))
  if [ "$rc" -eq 124 ]; then count[hang]=$((count[hang] + 1)); echo "hang: $*"
  elif [ "$rc" -gt 128 ]; then count[signal]=$((count[signal] + 1)); echo "signal $rc: $*"
  elif grep -q '^Traceback' "$work/err"; then
    count[traceback]=$((count[traceback] + 1)); echo "traceback: $*"; tail -n 1 "$work/err"
  elif [ "$rc" -eq 0 ]; then count[accepted]=$((count[accepted] + 1))
  elif [ "$rc" -eq 2 ] && [ "$(wc -l <"$work/err")" -eq 1 ] && grep -q '^moeprof: error:' "$work/err" \
      && [ ! -e "$work/out.moe" ]; then count[clean]=$((count[clean] + 1))
  else count[other]=$((count[other] + 1)); echo "exit $rc: $*"; tail -n 2 "$work/err"
  fi
}

for f in tests/data/robustness/*; do
  case "$f" in
    *.jsonl) run_case "$f" import "$f" -F long-jsonl -o "$work/out.moe" ;;
    *.csv) run_case "$f" import "$f" -F long-csv -o "$work/out.moe"
           run_case "$f" import "$f" -F sglang -o "$work/out.moe" ;;
    *.pt) run_case "$f" import "$f" -F sglang -o "$work/out.moe" ;;
    *.npy) run_case "$f" import "$f" -F vllm -o "$work/out.moe" ;;
  esac
done
for f in "$work"/case*; do
  case "$f" in
    *.moe) run_case "$f" analyze "$f" -b 1,4 ;;
    *.jsonl) run_case "$f" import "$f" -F long-jsonl -o "$work/out.moe" ;;
    *.csv) run_case "$f" import "$f" -F long-csv -o "$work/out.moe" ;;
  esac
done

echo
echo "| cases | clean errors | accepted | tracebacks | signals | hangs | other |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
echo "| ${count[cases]} | ${count[clean]} | ${count[accepted]} | ${count[traceback]} |" \
  "${count[signal]} | ${count[hang]} | ${count[other]} |"
crashes=$((count[traceback] + count[signal] + count[hang] + count[other]))
[ "$crashes" -eq 0 ]
