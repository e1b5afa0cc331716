#!/usr/bin/env bash
# One prepared device check, under 8 minutes on one GPU:
#   1. the search bench on the 256x4 LLaVA (text hidden 256 x 4 layers, 577
#      image tokens) in bfloat16: shared-prefix vs per-row vs released-code
#      style, MFU, peak memory, KV bytes;
#   2. the same on a ~0.9 B-parameter random LLaVA in bfloat16;
#   3. one `csr generate` + `csr train` on a throwaway study;
#   4. the DPO step bench: prefix-shared vs concatenated forward, 576 and
#      2,880 image tokens, on the ~0.9 B-parameter LLaVA in bfloat16.
#
#   bench/device_check.sh                 # on cuda
#   bench/device_check.sh --device cpu    # dry run: tiny sizes, one prompt (the test suite runs this)
set -euo pipefail

DEVICE=cuda
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [[ "$DEVICE" == cpu ]]; then
    # Dry run: every step on the smallest sizes, bfloat16 included.
    SMALL=(--size tiny --prompts 1 --threads 1 --max-new-tokens 6 --max-length 18)
    BIG=(--size tiny --prompts 1 --threads 1 --max-new-tokens 6 --max-length 18 --no-naive)
    DPO=(--size tiny --steps 1)
else
    SMALL=(--size 256x4 --prompts 4 --threads 4)
    BIG=(--size 1b --prompts 2 --threads 4 --max-new-tokens 20 --max-length 60)
    DPO=(--size 1b --steps 3 --threads 4)
fi

echo "== search bench, ${SMALL[1]} model, bfloat16, $DEVICE"
timeout 240 "$PYTHON" "$HERE/bench_search.py" "${SMALL[@]}" --device "$DEVICE" --dtype bfloat16
echo "== search bench, ${BIG[1]} model, bfloat16, $DEVICE"
timeout 180 "$PYTHON" "$HERE/bench_search.py" "${BIG[@]}" --device "$DEVICE" --dtype bfloat16
echo "== csr generate + train on a throwaway study, $DEVICE"
timeout 120 "$PYTHON" "$HERE/train_step_study.py" "$WORK/study" --device "$DEVICE" --dtype bfloat16
echo "== DPO step bench, ${DPO[1]} model, bfloat16, $DEVICE"
timeout 180 "$PYTHON" "$HERE/bench_dpo_prefix.py" "${DPO[@]}" --device "$DEVICE" --dtype bfloat16
echo "device check done"
