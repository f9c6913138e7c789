#!/bin/sh
# Before/after row for the backward that stops at the lowest trainable block:
# GPT-2-small shape, B=4, T=256, LoRA r=8 on qkv of the top 4 of 12 layers,
# timed with the full backward (PEFTREF_BACKWARD_ALL=1) and without, the two
# alternating so that a change of machine load hits both.  Prints a table.
#   sh bench/skip_backward.sh [BUILD_DIR] [STEPS]
set -eu
BUILD=$(cd "${1:-build}" && pwd)
STEPS=${2:-4}
SRC=$(cd "$(dirname "$0")/.." && pwd)
PEFTREF=$BUILD/peftref
export PEFTREF_PLUGIN_PATH=$BUILD/plugins/.libs
work=$(mktemp -d "${TMPDIR:-/tmp}/peftref-skipbw-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
# a text of ~70k GPT-2 tokens, made from the repository's data
for i in 1 2 3 4 5 6 7 8; do cat "$SRC"/data/fortunes/*.txt; done > "$work/text.txt"
cat > "$work/p.yaml" <<YAML
model: {preset: gpt2-small, tokenizer: $SRC/tests/data/tokenizer/gpt2}
task: {type: lm, train: $work/text.txt, val_fraction: 0.02}
modules:
  - {technique: lora, sites: [qkv], layers: [8, 9, 10, 11], options: {r: 8, alpha: 16}}
train: {steps: $((STEPS + 1)), batch: 4, seq_len: 256, lr: 1e-4, eval_every: 0, log_every: 1}
YAML
step_ms() { # median "seconds" difference of steps 2.. in a metrics file, in ms
    sed -n 's/^{"step": \([0-9]*\), "loss".*"seconds": \([0-9.]*\).*/\1 \2/p' "$1" |
        awk 'NR > 1 { d[n++] = ($2 - prev) * 1000 } { prev = $2 } END {
            for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (d[j] < d[i]) { t = d[i]; d[i] = d[j]; d[j] = t }
            printf "%.0f", n ? d[int((n - 1) / 2)] : 0 }'
}
run() { # label env-assignment round
    env $2 "$PEFTREF" train "$work/p.yaml" --set "train.output=$work/$1-$3" --force --quiet >/dev/null 2>"$work/err" ||
        { cat "$work/err" >&2; exit 1; }
    step_ms "$work/$1-$3/metrics.jsonl"
}
a1=$(run all PEFTREF_BACKWARD_ALL=1 1); s1=$(run skip PEFTREF_BACKWARD_ALL=0 1)
a2=$(run all PEFTREF_BACKWARD_ALL=1 2); s2=$(run skip PEFTREF_BACKWARD_ALL=0 2)
cmp -s "$work/all-1/modules/lora.safetensors" "$work/skip-1/modules/lora.safetensors" && same=yes || same=no
echo "GPT-2-small shape, B=4 T=256, LoRA r=8 on qkv of layers 8-11, $STEPS timed steps; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| backward | step ms (run 1) | step ms (run 2) | tokens/s (run 2) |"
echo "|---|---:|---:|---:|"
echo "| all 12 blocks (PEFTREF_BACKWARD_ALL=1) | $a1 | $a2 | $(awk -v m="$a2" 'BEGIN { printf "%.0f", 1024000 / m }') |"
echo "| down to block 8 (default) | $s1 | $s2 | $(awk -v m="$s2" 'BEGIN { printf "%.0f", 1024000 / m }') |"
echo "modules bit-identical: $same"
