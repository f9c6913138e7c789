#!/bin/sh
# train.recompute: true trains to the losses and module files of false, bit
# for bit: GPT-2 tiny with a dropout LoRA over two micro-batches per step,
# LLaMA tiny with prefix tuning, and a 4-layer GPT-2 with LoRA on layers 2
# and 3 only (the backward stops at layer 2, which alone is rerun); and
# sequence classification (the backward from the head's hidden states).
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-.}
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
corpus=$(cd "$srcdir" && pwd)/data/fortunes/adapt-train.txt
classify=$(cd "$srcdir" && pwd)/data/fortunes/classify-train.jsonl
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-recompute-XXXXXX") || exit 1
passed=0 failed=0
check() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $*"; fi; }
untimed() { sed 's/"time": [^,}]*//; s/"tokens_per_s": [^,}]*//; s/"step_seconds": [^,}]*//; s/"seconds": [^,}]*//' "$1"; }

run_case() { # name, model (a preset name or a mapping's keys), modules block, train extras[, task]
    name=$1 model=$2 mods=$3 extra=$4 task=${5:-"{type: lm, train: $corpus}"}
    case $model in "{"*) model=${model#?}; model=${model%?} ;; *) model="preset: $model" ;; esac
    cat > "$tmp/$name.yaml" <<YAML
model: {$model, seed: 5}
task: $task
modules:
$mods
train: {steps: 8, batch: 2, seq_len: 32, lr: 5e-3, seed: 1, log_every: 1, eval_every: 4$extra}
YAML
    for r in false true; do
        "$PEFTREF" train "$tmp/$name.yaml" --set "train.recompute=$r" --set "train.output=$tmp/$name-$r" --quiet \
            >/dev/null 2>"$tmp/$name-$r.err"
        rc=$?
        [ $rc -eq 0 ] || cat "$tmp/$name-$r.err"
        check [ $rc -eq 0 ]
        untimed "$tmp/$name-$r/metrics.jsonl" > "$tmp/$name-$r.m"
    done
    n=$(grep -c '"loss"' "$tmp/$name-false.m")
    check [ "$n" -ge 8 ]
    check cmp -s "$tmp/$name-false.m" "$tmp/$name-true.m"
    for f in "$tmp/$name-false"/modules/*.safetensors; do
        check [ -f "$f" ]
        check cmp -s "$f" "$tmp/$name-true/modules/$(basename "$f")"
    done
    echo "$name: $n loss lines and the modules equal with and without recompute"
}

run_case gpt2-lora-dropout gpt2-tiny \
    "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8, dropout: 0.1}}" ", accum: 2"
run_case llama-prefix llama-tiny "  - {technique: prefix_tuning, options: {n_tokens: 4}}" ""
run_case gpt2-top-lora "{config: {n_layers: 4}}" \
    "  - {technique: lora, sites: [q, v, ffn.down], layers: [2, 3], options: {r: 4, alpha: 8}}" ""
run_case gpt2-classify gpt2-tiny "  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8}}" "" \
    "{type: classification, train: $classify}"

# a value that is not a boolean is an error naming the key
printf 'model: {preset: gpt2-tiny}\ntask: {type: lm, train: %s}\nmodules: [{technique: lora}]\ntrain: {steps: 1, recompute: sometimes}\n' \
    "$corpus" > "$tmp/bad.yaml"
"$PEFTREF" train "$tmp/bad.yaml" --set "train.output=$tmp/bad" --quiet >/dev/null 2>"$tmp/bad.err"
check [ $? -ne 0 ]
check grep -q "train.recompute" "$tmp/bad.err"

[ "$failed" -eq 0 ] && rm -rf "$tmp"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
