#!/usr/bin/env bash
# f32 against bf16 (train.precision / --precision) on the path users run:
# `peftref train PIPELINE.yaml` (LoRA plugin, module host, AdamW, data
# loader) and `peftref eval`, at GPT-2-small shape (preset gpt2-small,
# seeded random init, GPT-2's tokenizer from tests/data), B=4, T=256.
#
#   bash bench/bf16.sh [BUILD_DIR]          (default: build)
#   STEPS=6 WARMUP=2 EVAL_BATCHES=6 bash bench/bf16.sh build
#   bash bench/bf16.sh BUILD_DIR threads    the bf16 training row under thread
#                                           settings (oversubscription check)
#   bash bench/bf16.sh BUILD_DIR pack       bf16 products with plain or packed
#                                           weights (bench/bf16_pack.c)
#
# Rows: tokens/s and peak RSS (the process's VmHWM, /usr/bin/time %M) of
#   lora-qkv r8  train steps: B*T tokens per step over the steps after WARMUP
#                (metrics.jsonl's cumulative "seconds"), LoRA r 8 on the fused
#                qkv of every layer, AdamW, lr 1e-4;
#   eval         forward only (`peftref eval`, 4 windows of 256 per forward):
#                (tokens of a long run - tokens of a one-batch run) / (the
#                difference of their seconds), so model creation cancels.
# Printed with the CPU, oneDNN's ISA and the measured 512x768x768 product
# rates of `peftref runtime`.  Run it on an otherwise idle machine: the
# load average is printed before and after.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=$(cd "${1:-build}" && pwd)
mode=${2:-table}
bin=$build/peftref
export PEFTREF_PLUGIN_PATH=$build/plugins/.libs
STEPS=${STEPS:-6}
WARMUP=${WARMUP:-2}
EVAL_BATCHES=${EVAL_BATCHES:-6}
B=4 T=256
work=$(mktemp -d "${TMPDIR:-/tmp}/peftref-bf16-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT

for f in "$src/data/fortunes/adapt-train.txt"; do
    for _ in 1 2 3 4 5 6; do cat "$f"; done
done > "$work/text.txt"

cat > "$work/lora.yaml" <<EOF
model:
  preset: gpt2-small
  tokenizer: $src/tests/data/tokenizer/gpt2
task:
  type: lm
  train: $work/text.txt
  val_fraction: 0.05
modules:
  - {technique: lora, sites: [qkv], options: {r: 8, alpha: 16}}
train:
  steps: $((STEPS + WARMUP))
  batch: $B
  seq_len: $T
  lr: 1e-4
  eval_every: 1000000
  eval_batches: 1
  log_every: 1
  progress: none
EOF

peak_kb() { sed -n 's/^PEAK_KB //p' "$1" | tail -n 1; }

# tokens/s of the training steps after WARMUP, from metrics.jsonl
train_row() {
    local prec=$1 out=$work/run-$1
    /usr/bin/time -f 'PEAK_KB %M
CPU %P
CSW %c %w' "$bin" train "$work/lora.yaml" --set train.output="$out" \
        --set train.precision="$prec" --force --quiet > "$work/train-$prec.log" 2> "$work/train-$prec.err" ||
        { cat "$work/train-$prec.err" >&2; exit 1; }
    python3 - "$out/metrics.jsonl" "$WARMUP" $((B * T)) <<'PY'
import json, sys
path, warm, tok = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = {}
for line in open(path):
    r = json.loads(line)
    if "loss" in r and "seconds" in r:
        s[r["step"]] = r["seconds"]
last = max(s)
print("%.1f %.4f" % (tok * (last - warm) / (s[last] - s[warm]), (s[last] - s[warm]) / (last - warm)))
PY
}

eval_once() { # precision windows -> "tokens seconds"
    local prec=$1 w=$2
    /usr/bin/time -f 'PEAK_KB %M' "$bin" eval --preset gpt2-small --tokenizer "$src/tests/data/tokenizer/gpt2" \
        --data "$work/eval-$w.txt" --seq-len $T --batch $B --json --precision "$prec" \
        > "$work/eval-$prec-$w.json" 2> "$work/eval-$prec-$w.err" || { cat "$work/eval-$prec-$w.err" >&2; exit 1; }
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["tokens"], r["seconds"])' \
        "$work/eval-$prec-$w.json"
}

# eval texts of exactly 1 and EVAL_BATCHES forwards (B windows of T tokens each)
python3 - "$work" "$src/tests/data/tokenizer/gpt2" "$B" "$T" "$EVAL_BATCHES" <<'PY'
import sys
work, _, B, T, nb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
text = open(work + "/text.txt", encoding="utf-8", errors="replace").read()
# GPT-2 BPE gives about 3.5 bytes per token on this English text; windows
# are cut from the token count, so take generously and let eval count
for w, n in (("1", 1), ("n", nb)):
    open(work + "/eval-%s.txt" % w, "w").write(text[: int(n * B * T * 4.2)])
PY

if [ "$mode" = pack ]; then
    # packed (oneDNN's preferred layout) against plain bf16 weights
    ${CC:-cc} -O2 -o "$work/bf16_pack" "$src/bench/bf16_pack.c" -ldnnl
    echo "bf16 matmul, weights plain or packed; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    OMP_WAIT_POLICY=passive "$work/bf16_pack"
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi
if [ "$mode" = threads ]; then
    # oneDNN (OpenMP, libgomp) and OpenBLAS (its own pthreads) share 2 cores:
    # idle OpenMP workers that spin (OMP_WAIT_POLICY=active, or libgomp's
    # default spin count) hold a core while OpenBLAS works, and OpenBLAS's
    # workers spin after a GEMM while oneDNN works (sched_yield for 2^28
    # cycles; OPENBLAS_THREAD_TIMEOUT=n makes that 2^n, and peftref sets 4).
    # CPU is the process's (200% = both cores); invol. csw its preemptions.  Involuntary context
    # switches (preemptions) and s/step show it.
    echo "threads: bf16 LoRA training, $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%-58s %9s %10s %8s %14s\n' "setting" "tokens/s" "s/step" "CPU" "invol. csw"
    run_setting() {
        local label=$1; shift
        read -r t s <<< "$(export "$@"; train_row bf16)"
        printf '%-58s %9s %10s %8s %14s\n' "$label" "$t" "$s" "$(sed -n 's/^CPU //p' "$work/train-bf16.err")" \
            "$(sed -n 's/^CSW //p' "$work/train-bf16.err" | cut -d' ' -f1)"
    }
    run_setting "peftref's (OMP_WAIT_POLICY=passive OPENBLAS_THREAD_TIMEOUT=4)" PEFTREF_BENCH_DEFAULT=1
    run_setting "OPENBLAS_THREAD_TIMEOUT=28 (OpenBLAS workers spin)" OPENBLAS_THREAD_TIMEOUT=28
    run_setting "OMP_WAIT_POLICY=active (OpenMP workers spin)" OMP_WAIT_POLICY=active
    run_setting "OPENBLAS_NUM_THREADS=1" OPENBLAS_NUM_THREADS=1
    run_setting "OMP_NUM_THREADS=1 (oneDNN and our loops on one thread)" OMP_NUM_THREADS=1
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
    exit 0
fi

echo "peftref bf16 benchmark: GPT-2-small shape (preset gpt2-small), B=$B, T=$T"
echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1), $(nproc) cores"
"$bin" runtime | sed 's/^/  /'
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "env: OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-unset}" \
     "OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-unset (peftref sets passive)}" \
     "OPENBLAS_THREAD_TIMEOUT=${OPENBLAS_THREAD_TIMEOUT:-unset (peftref sets 4)}"
echo
printf '%-28s %12s %12s %12s\n' "workload" "tokens/s" "s/step" "peak RSS MB"
declare -A tps
for prec in f32 bf16; do
    read -r t s <<< "$(train_row "$prec")"
    tps[train-$prec]=$t
    printf '%-28s %12s %12s %12.0f\n' "lora-qkv r8 train ($prec)" "$t" "$s" "$(($(peak_kb "$work/train-$prec.err") / 1024))"
done
for prec in f32 bf16; do
    read -r n1 s1 <<< "$(eval_once "$prec" 1)"
    read -r nn sn <<< "$(eval_once "$prec" n)"
    t=$(python3 -c "print('%.1f' % (($nn - $n1) / ($sn - $s1)))")
    tps[eval-$prec]=$t
    printf '%-28s %12s %12s %12.0f\n' "eval forward ($prec)" "$t" "-" "$(($(peak_kb "$work/eval-$prec-n.err") / 1024))"
done
echo
python3 -c "print('bf16 / f32 tokens/s: train %.2fx, eval %.2fx' % (${tps[train-bf16]} / ${tps[train-f32]}, ${tps[eval-bf16]} / ${tps[eval-f32]}))"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
