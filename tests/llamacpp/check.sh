#!/usr/bin/env bash
# peftref's GGUF exports checked by llama.cpp itself (docs/gguf.md).
#
#   bash tests/llamacpp/check.sh BUILD_DIR
#
# Installs the npm package node-llama-cpp (llama.cpp's prebuilt CPU
# libraries in @node-llama-cpp/linux-x64; --ignore-scripts, nothing built or
# downloaded at run time), compiles tests/llamacpp/llamacpp_check.c against
# the llama.h of the llama.cpp release that package ships, then for a
# LLaMA-family and a GPT-2 model: trains a LoRA in peftref, exports the base
# and the adapter (and the merged model) to GGUF, evaluates one token
# sequence in llama.cpp with an F32 K/V cache and compares every logit with
# peftref's.  Skips (exit 0, with the reason) only when npm cannot reach its
# registry.
set -euo pipefail
BUILD=$(cd "${1:-build}" && pwd)
SRC=$(cd "$(dirname "$0")/../.." && pwd)
NLC_VERSION=3.22.1
WORK=$BUILD/llamacpp-check
say() { printf 'llamacpp-check: %s\n' "$*"; }

if ! command -v npm >/dev/null; then
    say "SKIP: npm is not installed"; exit 0
fi
if ! timeout 60 npm view "node-llama-cpp@$NLC_VERSION" version >/dev/null 2>&1; then
    say "SKIP: the npm registry cannot be reached (npm view node-llama-cpp failed)"; exit 0
fi
mkdir -p "$WORK/npm"
if [ ! -d "$WORK/npm/node_modules/@node-llama-cpp/linux-x64/bins" ]; then
    say "installing node-llama-cpp@$NLC_VERSION and @node-llama-cpp/linux-x64 (--ignore-scripts)"
    (cd "$WORK/npm" && timeout 600 npm install --ignore-scripts --no-audit --no-fund --no-save \
        "node-llama-cpp@$NLC_VERSION" "@node-llama-cpp/linux-x64@$NLC_VERSION" >/dev/null)
fi
NLC=$WORK/npm/node_modules/node-llama-cpp
LIB=$WORK/npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64
# the headers of the llama.cpp release the prebuilt libraries were built from
if [ ! -f "$WORK/llama.cpp/include/llama.h" ]; then
    rm -rf "$WORK/llama.cpp"
    git clone -q "$NLC/llama/gitRelease.bundle" "$WORK/llama.cpp" 2>/dev/null
fi
say "llama.cpp $(cat "$NLC/llama/binariesGithubRelease.json" | tr -d ' \n') (node-llama-cpp $NLC_VERSION), bundle commit $(git -C "$WORK/llama.cpp" rev-parse --short HEAD)"
LLAMA_SO=$(cd "$LIB" && ls libllama.v*.so | head -1)
GGML_SO=$(cd "$LIB" && ls libggml.v*.so | head -1)
cc -O2 -Wall -Wextra -o "$WORK/llamacpp_check" "$SRC/tests/llamacpp/llamacpp_check.c" \
    -I"$WORK/llama.cpp/include" -I"$WORK/llama.cpp/ggml/include" \
    -L"$LIB" -l:"$LLAMA_SO" -l:"$GGML_SO" -l:libggml-base.so -Wl,-rpath,"$LIB" -lm

make -C "$BUILD" -s peftref tests/llamacpp/peftref_logits plugins/lora.la >/dev/null
PEFTREF=$BUILD/peftref
LOGITS=$BUILD/tests/llamacpp/peftref_logits
export PEFTREF_PLUGIN_PATH=$BUILD/plugins/.libs
CHECK() { "$WORK/llamacpp_check" "$LIB" "$@" 2> "$WORK/llama.log" || { cat "$WORK/llama.log" >&2; return 1; }; }
# the byte tokenizer's ids of a text
TOKENS=$(printf 'A little suffering is good for the soul. -- Kirk' | od -An -tu1 -v | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
DATA=$SRC/data/fortunes/adapt-train.txt
failed=0

# family  preset      sites                                        tolerance (see docs/gguf.md)
for spec in "llama llama-tiny [q, k, v, o, ffn.gate, ffn.up, ffn.down] 1e-4" \
            "gpt2 gpt2-tiny [q, v, o, ffn.up, ffn.down] 1e-3"; do
    set -- $spec
    fam=$1 preset=$2 tol=${*: -1}
    sites=$(echo "$spec" | sed 's/.*\(\[.*\]\).*/\1/')
    d=$WORK/$fam
    rm -rf "$d" && mkdir -p "$d"
    cat > "$d/base.yaml" <<YAML
model: {preset: $preset, seed: 11}
task: {type: lm, train: $DATA}
modules: []
train: {steps: 1, batch: 1, seq_len: 16, output: $d/base-run}
YAML
    cat > "$d/lora.yaml" <<YAML
model: {preset: $preset, seed: 11}
task: {type: lm, train: $DATA}
modules:
  - technique: lora
    sites: $sites
    options: {r: 4, alpha: 8, use_rslora: true}
    site_options:
      v: {r: 2, alpha: 3}
train: {steps: 40, batch: 4, seq_len: 48, lr: 1e-2, seed: 3, output: $d/run}
YAML
    "$PEFTREF" train "$d/lora.yaml" --quiet | tail -1
    "$PEFTREF" export "$d/base.yaml" --format gguf --base --out "$d/base.gguf"
    "$PEFTREF" export "$d/base.yaml" --format gguf --base --dtype f16 --out "$d/base-f16.gguf"
    "$PEFTREF" export "$d/run" --format gguf --out "$d/lora.gguf"
    "$PEFTREF" export "$d/run" --format gguf --base --out "$d/merged.gguf"
    "$LOGITS" "$d/base.yaml" "$TOKENS" "$d/ref-base.bin" >/dev/null
    "$LOGITS" "$d/run/pipeline.yaml" "$TOKENS" "$d/ref-lora.bin" >/dev/null
    moved=$("$LOGITS" --diff "$d/ref-lora.bin" "$d/ref-base.bin")
    say "$fam: the adapter moves peftref's logits by $moved relative (must be >= 100 x $tol)"
    awk -v m="$moved" -v t="$tol" 'BEGIN { exit !(m >= 100 * t) }' || { say "$fam: FAIL: the adapter barely moves the logits"; failed=1; }
    CHECK "$d/base.gguf" - "$TOKENS" "$d/ref-base.bin" "$tol" || failed=1
    CHECK "$d/base.gguf" "$d/lora.gguf" "$TOKENS" "$d/ref-lora.bin" "$tol" || failed=1
    CHECK "$d/merged.gguf" - "$TOKENS" "$d/ref-lora.bin" "$tol" || failed=1
    # f16 weights: rounding the weights alone costs about 1e-3
    CHECK "$d/base-f16.gguf" - "$TOKENS" "$d/ref-base.bin" 1e-2 || failed=1
    # the round trip peftref -> Hugging Face PEFT -> peftref -> GGUF: the PEFT
    # adapter loaded back gives the run's logits bit for bit, and its GGUF
    # export what llama.cpp computes within the same tolerance (LLaMA: GPT-2's
    # q and v slices of c_attn have no PEFT module name)
    [ "$fam" = llama ] || continue
    "$PEFTREF" export "$d/run" --format peft --out "$d/peft"
    cat > "$d/from-peft.yaml" <<YAML
model: {preset: $preset, seed: 11}
task: {type: lm, train: $DATA}
modules:
  - load: $d/peft
    mode: frozen
train: {steps: 1, batch: 1, seq_len: 16, output: $d/peft-run}
YAML
    "$LOGITS" "$d/from-peft.yaml" "$TOKENS" "$d/ref-peft.bin" >/dev/null
    same=$("$LOGITS" --diff "$d/ref-peft.bin" "$d/ref-lora.bin")
    say "$fam: peftref -> PEFT -> peftref moves the logits by $same relative (must be 0)"
    awk -v m="$same" 'BEGIN { exit !(m == 0) }' || { say "$fam: FAIL: the PEFT round trip changed the logits"; failed=1; }
    "$PEFTREF" export "$d/from-peft.yaml" --format gguf --out "$d/peft-lora.gguf"
    CHECK "$d/base.gguf" "$d/peft-lora.gguf" "$TOKENS" "$d/ref-lora.bin" "$tol" || failed=1
done
if [ "$failed" = 0 ]; then say "passed"; else say "FAILED"; fi
exit "$failed"
