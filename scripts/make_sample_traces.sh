#!/usr/bin/env bash
# Regenerates the synthetic sample traces in traces/ that the README's examples use.
set -euo pipefail
cd "$(dirname "$0")/.."
MOEPROF=${MOEPROF:-.venv/bin/moeprof}
# Mixtral-8x7B-like: 32 MoE layers, top-2 of 8, one bf16 expert = 3 x 4096 x 14336 x 2 bytes.
$MOEPROF synth -o traces/mixtral-like.moe --experts 8 --top-k 2 --layers 32 --requests 16 \
  --tokens 128 --length-spread 0.5 --zipf 0.6 --locality 0.3 --expert-bytes 352321536 --seed 1 --force
# DeepSeek-V2-Lite-like: 26 MoE layers, top-6 of 64, one bf16 expert = 3 x 2048 x 1408 x 2 bytes.
$MOEPROF synth -o traces/deepseek-like.moe --experts 64 --top-k 6 --layers 26 --requests 8 \
  --tokens 128 --length-spread 0.5 --zipf 1.0 --locality 0.2 --expert-bytes 17301504 --seed 2 --force
