#!/bin/sh
# The backward stops at the lowest block anything trainable needs (a LoRA on
# the top layer differentiates one block, not all): training with it gives
# the losses and module files of the full backward (PEFTREF_BACKWARD_ALL=1)
# bit for bit, for a module on the top layer, a prefix on the top layer and a
# top layer with two modules (ia3 and a LoRA on ffn.down); and the lowest block
# run makes no input gradient of its own (LoRA on every layer, GPT-2 and
# LLaMA), unless its first norm trains (LayerNorm tuning on the top layer).
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-.}
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
corpus=$(cd "$srcdir" && pwd)/data/fortunes/adapt-train.txt
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-skipbw-XXXXXX") || exit 1
passed=0 failed=0
check() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }

run_case() { # name, modules block [, preset]
    name=$1 mods=$2 preset=${3:-llama-tiny}
    cat > "$tmp/$name.yaml" <<YAML
model: {preset: $preset, seed: 5}
task: {type: lm, train: $corpus}
modules:
$mods
train: {steps: 12, batch: 2, seq_len: 32, lr: 5e-3, seed: 1, log_every: 1}
YAML
    "$PEFTREF" train "$tmp/$name.yaml" --set "train.output=$tmp/$name-skip" --quiet >/dev/null 2>"$tmp/$name.err1"
    a=$?
    PEFTREF_BACKWARD_ALL=1 "$PEFTREF" train "$tmp/$name.yaml" --set "train.output=$tmp/$name-all" --quiet \
        >/dev/null 2>"$tmp/$name.err2"
    b=$?
    [ $a -eq 0 -a $b -eq 0 ] || cat "$tmp/$name.err1" "$tmp/$name.err2"
    check [ $a -eq 0 -a $b -eq 0 ]
    sed 's/"time": [^,}]*//; s/"tokens_per_s": [^,}]*//; s/"step_seconds": [^,}]*//; s/"seconds": [^,}]*//' "$tmp/$name-skip/metrics.jsonl" > "$tmp/$name.m1"
    sed 's/"time": [^,}]*//; s/"tokens_per_s": [^,}]*//; s/"step_seconds": [^,}]*//; s/"seconds": [^,}]*//' "$tmp/$name-all/metrics.jsonl" > "$tmp/$name.m2"
    check cmp -s "$tmp/$name.m1" "$tmp/$name.m2"
    for f in "$tmp/$name-skip"/modules/*.safetensors; do
        check cmp -s "$f" "$tmp/$name-all/modules/$(basename "$f")"
    done
    echo "$name: $(grep -c '"loss"' "$tmp/$name.m1") steps, losses and modules equal"
}

run_case top-lora "  - {technique: lora, sites: [q, v], layers: [1], options: {r: 4, alpha: 8, dropout: 0.1}}"
run_case top-prefix "  - {technique: prefix_tuning, layers: [1], options: {n_tokens: 4}}"
run_case top-two-modules "  - {technique: ia3, layers: [1]}
  - {technique: lora, sites: [ffn.down], layers: [1], options: {r: 2, alpha: 4}}"
run_case all-lora-llama "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8}}"
run_case all-lora-gpt2 "  - {technique: lora, sites: [qkv], options: {r: 4, alpha: 8}}" gpt2-tiny
run_case top-lnfit-gpt2 "  - {technique: lnfit, layers: [1]}" gpt2-tiny
[ "$failed" -eq 0 ] && rm -rf "$tmp"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
