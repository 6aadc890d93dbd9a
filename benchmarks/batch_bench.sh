#!/usr/bin/env bash
# `mmgen batch` images/s: in-process, Ray local with 1 worker, Ray local with 2 workers, on the same
# 48-image request file (6 classes x 8, 10 DDIM steps, ONNX Runtime fp32, 1 thread per runner).
# Prints figures, asserts nothing. Run it under `flock /tmp/mmgen-heavy.lock` on a shared machine.
#   benchmarks/batch_bench.sh RUN_DIR [WORK_DIR]
set -euo pipefail
RUN=${1:?usage: benchmarks/batch_bench.sh RUN_DIR [WORK_DIR]}
WORK=${2:-$(mktemp -d)}
MMGEN=${MMGEN:-mmgen}
REQ=$WORK/requests.jsonl
: > "$REQ"
for i in 0 1 2 3 4 5; do echo "{\"class\": $((i * 3)), \"n\": 8, \"seed\": $i}" >> "$REQ"; done
for mode in in-process ray-1 ray-2; do
  rm -rf "$WORK/$mode"
  extra=()
  case $mode in ray-1) extra=(--ray local --workers 1) ;; ray-2) extra=(--ray local --workers 2) ;; esac
  uptime
  "$MMGEN" batch "$RUN" "$REQ" --out "$WORK/$mode" --steps 10 --threads 1 --backend onnxruntime --precision fp32 \
    "${extra[@]}" --json "$WORK/$mode.json" > /dev/null
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(f\"{sys.argv[2]}: {d['written']} images in \
{d['seconds']:.1f} s = {d['images_per_second']:.2f} images/s; {d['steady_images_per_second']:.2f} images/s after the \
first batch ({d['first_batch_seconds']:.1f} s to it)\")" "$WORK/$mode.json" "$mode"
done
