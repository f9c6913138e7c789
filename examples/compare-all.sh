#!/usr/bin/env bash
# Every installed technique on the built-in task (examples/fortunes-compare-all.yaml):
# trains the two LoRA experts the adapter_fusion and xlora arms combine, then
# compares all arms.  Writes runs/compare-all/ (table.md, curves.svg, arms/).
#   bash examples/compare-all.sh [PEFTREF]      (default: build/peftref)
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
peftref=${1:-$src/build/peftref}
out=$src/runs/compare-all
cd "$src"
for m in classify adapt; do
    if [ ! -f "$out/members/$m/modules/lora.safetensors" ]; then
        echo "compare-all: training the LoRA expert '$m'" >&2
        "$peftref" train "examples/members/lora-$m.yaml" --set train.output="$out/members/$m" --progress none --force
    fi
done
"$peftref" compare examples/fortunes-compare-all.yaml --out "$out/table" --resume
