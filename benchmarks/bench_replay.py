"""Benchmark: does the replayer measure what it counts? (GPU; on the CPU it runs the CPU backend.)

Trace: synthetic, 8 experts top-2, 2 MoE layers, 8 requests x 32 tokens, Zipf 0.8; policy
tokens, batch size 64; strategies naive and dedup; expert blocks of 4, 16 and 64 MiB. Targets
(issue 5), per block size:

1. dedup's host->device GB/s >= 90% of the calibrated pinned peak;
2. NVML RX bytes / counted payload within 1.00-1.10x (when NVML byte counters exist);
3. naive/dedup time ratio within 10% of their byte ratio.

    python benchmarks/bench_replay.py [--device auto|cuda|cpu] [--blocks-mib 4,16,64]
                                      [--json OUT] [--strict]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import moeprof
from moeprof.replay import replay

TARGET_SHARE_OF_PEAK = 0.90
TARGET_RX_RATIO = (1.00, 1.10)
TARGET_TIME_VS_BYTES = 0.10


def run_block(device: str, block_bytes: int, calibration_bytes: int) -> dict[str, Any]:
    trace = moeprof.synthesize(
        n_experts=8, top_k=2, n_layers=2, n_requests=8, tokens_per_request=32, zipf=0.8, seed=0
    )
    doc = replay(
        trace,
        device=device,
        strategies=("naive", "dedup"),
        batch_sizes=[64],
        expert_bytes=block_bytes,
        calibration_bytes=calibration_bytes,
    ).to_dict()
    row = doc["results"][0]
    s = {x["strategy"]: x for x in row["replay"]["strategies"]}
    naive, dedup = s["naive"], s["dedup"]
    byte_ratio = naive["bytes_copied"] / dedup["bytes_copied"]
    time_ratio = naive["seconds"] / dedup["seconds"]
    rx_ratio = dedup["measured_to_counted"]
    return {
        "block_bytes": block_bytes,
        "peak_gbps": doc["replay"]["peak_h2d_gbps"],
        "dedup_gbps": dedup["gbps"],
        "naive_gbps": naive["gbps"],
        "dedup_share_of_peak": dedup["share_of_peak"],
        "rx_to_counted_dedup": rx_ratio,
        "rx_to_counted_naive": naive["measured_to_counted"],
        "byte_ratio": byte_ratio,
        "time_ratio": time_ratio,
        "time_vs_bytes": time_ratio / byte_ratio - 1.0,
        "naive_copies": naive["copies"],
        "dedup_copies": dedup["copies"],
        "method": doc["replay"]["measurement_method"],
        "method_reason": doc["replay"]["measurement_reason"],
        "device_name": doc["replay"].get("device_name"),
        "ran_on_cpu": doc["replay"]["ran_on_cpu"],
    }


def verdicts(r: dict[str, Any]) -> dict[str, bool | None]:
    rx = r["rx_to_counted_dedup"]
    return {
        "share_of_peak": r["dedup_share_of_peak"] >= TARGET_SHARE_OF_PEAK
        if r["dedup_share_of_peak"] is not None
        else None,
        "rx_ratio": None if rx is None else TARGET_RX_RATIO[0] <= rx <= TARGET_RX_RATIO[1],
        "time_vs_bytes": abs(r["time_vs_bytes"]) <= TARGET_TIME_VS_BYTES,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--blocks-mib", default=None, help="expert block sizes in MiB")
    parser.add_argument("--json", default=None, help="write the measurements here")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = device == "cpu"
    if on_cpu:
        print(
            "No GPU: running the CPU backend (host-to-host copies). The GPU targets do not apply; "
            "this only shows the code path and its counts.\n"
        )
    blocks = [
        int(float(x) * (1 << 20))
        for x in (args.blocks_mib or ("1" if on_cpu else "4,16,64")).split(",")
    ]
    calibration = (256 << 20) if on_cpu else (1 << 30)
    results = []
    for block in blocks:
        r = run_block(device, block, calibration)
        r["verdicts"] = verdicts(r)
        results.append(r)

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None or on_cpu else ("PASS" if ok else "FAIL")

    first = results[0]
    print(f"device: {first['device_name']} ({device}); PCIe measurement: {first['method']}")
    if first["method_reason"]:
        print(f"  ({first['method_reason']})")
    print(f"calibrated peak: {first['peak_gbps']:.2f} GB/s\n")
    header = (
        f"{'block':>8} {'dedup GB/s':>10} {'% peak':>7} {'':>4}  {'RX/counted':>10} {'':>4}  "
        f"{'time ratio':>10} {'byte ratio':>10} {'diff':>7} {'':>4}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        v = r["verdicts"]
        rx = r["rx_to_counted_dedup"]
        print(
            f"{r['block_bytes'] / (1 << 20):>6.0f}Mi {r['dedup_gbps']:>10.2f} "
            f"{100 * (r['dedup_share_of_peak'] or 0):>6.1f}% {mark(v['share_of_peak']):>4}  "
            f"{'—' if rx is None else f'{rx:.3f}x':>10} {mark(v['rx_ratio']):>4}  "
            f"{r['time_ratio']:>10.2f} {r['byte_ratio']:>10.2f} {100 * r['time_vs_bytes']:>+6.1f}% "
            f"{mark(v['time_vs_bytes']):>4}"
        )
    print(
        f"\ntargets: dedup >= {100 * TARGET_SHARE_OF_PEAK:.0f}% of peak; NVML RX / counted "
        f"{TARGET_RX_RATIO[0]:.2f}-{TARGET_RX_RATIO[1]:.2f}x; naive/dedup time ratio within "
        f"{100 * TARGET_TIME_VS_BYTES:.0f}% of the byte ratio"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "results": results}, fh, indent=2)
    failed = not on_cpu and any(ok is False for r in results for ok in r["verdicts"].values())
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
