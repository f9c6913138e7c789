#!/bin/sh
# Data-parallel scaling on one host, and its projection to a cluster.
#
#   sh bench/mpi_scaling.sh [STEPS]          (from a build directory; make bench-mpi)
#
# Trains a compute-bound model (GPT-2 shape, 4 layers, d_model 256, d_ff
# 1024, 256 byte tokens, batch 8 x 128 positions) for STEPS (default 12)
# steps, in two ways of using 2 cores, for two kinds of trainable state:
#   1 rank x 2 threads   peftref train, OPENBLAS_NUM_THREADS=2
#   2 ranks x 1 thread   mpirun -np 2 peftref train, OPENBLAS_NUM_THREADS=1
#   lora: LoRA r 8 on q, v (the all-reduce is small); full: every tensor
# and prints tokens/s of each (steps 2..STEPS, the first is warm-up) and
# the gradient all-reduce's share of the 2-rank step time (metrics.jsonl's
# allreduce_seconds over step_seconds).
#
# Then the projection to 8 and 64 ranks on a 25 Gb/s network, each rank
# one core with the 2-rank run's share (4 rows of 128) of every batch
# (weak scaling: the global batch grows with N):
#   t_comp          the measured 2-rank step time minus its all-reduce (one
#                   rank's compute on its share, unchanged as N grows)
#   S               trainable parameters x 4 bytes (f32 gradients)
#   t_ar(N)         2 (N-1)/N x S / B + 2 (N-1) x a     ring all-reduce
#                   (Patarasuk & Yuan 2009): B = 25 Gb/s = 3.125e9 bytes/s,
#                   a = 25 us per message (TCP over 25 GbE)
#   efficiency(N)   t_comp / (t_comp + t_ar(N)), no overlap of the
#                   all-reduce with the backward (peftref does not overlap)
#   speed-up(N)     N x efficiency(N) over one rank
set -u
STEPS=${1:-12}
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-$(dirname "$0")/..}
case $srcdir in /*) ;; *) srcdir=$(pwd)/$srcdir ;; esac
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
if "$PEFTREF" runtime | grep -q "^mpi: not built" || ! command -v mpirun >/dev/null 2>&1; then
    echo "mpi_scaling: skipped: peftref was built without MPI or mpirun is missing (install libopenmpi-dev openmpi-bin)"
    exit 0
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-bench-mpi-XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
corpus=$srcdir/tests/data/train/corpus.txt
B=8
T=128
for kind in lora full; do
    case $kind in
    lora) mods="  - {technique: lora, sites: [q, v], options: {r: 8, alpha: 16}}" ;;
    full) mods="  - {technique: full}" ;;
    esac
    cat > "$tmp/$kind.yaml" <<YAML
model:
  config: {n_layers: 4, d_model: 256, n_heads: 4, d_ff: 1024, vocab: 256, max_seq: $T}
modules:
$mods
task: {type: lm, train: $corpus, val_fraction: 0.05}
train: {steps: $STEPS, batch: $B, seq_len: $T, lr: 1e-3, log_every: 0, eval_batches: 1}
YAML
done

# rate METRICS: tokens/s over steps 2..N (B*T positions a step; text rows are full)
rate() {
    sed -n 's/^{"step": \([0-9]*\), "loss".*"seconds": \([0-9.]*\).*/\1 \2/p' "$1" |
        awk -v bt=$((B * T)) 'NR == 1 { s1 = $2 } { n = $1; s = $2 } END { printf "%.0f", (n - 1) * bt / (s - s1) }'
}
# share METRICS: "allreduce_seconds step_seconds" summed over steps 2..N
share() {
    sed -n 's/.*"step": \([0-9]*\),.*"step_seconds": \([0-9.]*\), "allreduce_seconds": \([0-9.]*\).*/\1 \2 \3/p' "$1" |
        awk '$1 > 1 { st += $2; ar += $3; n++ } END { printf "%.6f %.6f %d", ar / n, st / n, n }'
}

printf "%-5s %12s %-22s %10s %14s %16s\n" kind trainable layout tokens/s "step (ms)" "all-reduce"
for kind in lora full; do
    OPENBLAS_NUM_THREADS=2 OMP_NUM_THREADS=2 "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-1" \
        --quiet > "$tmp/$kind-1.out" 2>&1 || { cat "$tmp/$kind-1.out"; exit 1; }
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 mpirun --oversubscribe --allow-run-as-root -np 2 \
        -x PEFTREF_PLUGIN_PATH -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS \
        "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-2" --quiet > "$tmp/$kind-2.out" 2>&1 ||
        { cat "$tmp/$kind-2.out"; exit 1; }
    n=$(sed -n 's/^trainable params: \([0-9,]*\) .*/\1/p' "$tmp/$kind-1.out" | head -n1 | tr -d ,)
    r1=$(rate "$tmp/$kind-1/metrics.jsonl")
    r2=$(rate "$tmp/$kind-2/metrics.jsonl")
    set -- $(share "$tmp/$kind-2/metrics.jsonl")
    ar=$1
    st=$2
    printf "%-5s %12s %-22s %10s %14s %16s\n" $kind "$n" "1 rank x 2 threads" "$r1" \
        "$(awk -v r=$r1 -v bt=$((B * T)) 'BEGIN { printf "%.1f", 1000 * bt / r }')" "-"
    printf "%-5s %12s %-22s %10s %14s %16s\n" $kind "$n" "2 ranks x 1 thread" "$r2" \
        "$(awk -v s=$st 'BEGIN { printf "%.1f", 1000 * s }')" \
        "$(awk -v a=$ar -v s=$st 'BEGIN { printf "%.2f ms %.1f%%", 1000 * a, 100 * a / s }')"
    echo "$kind $n $ar $st" >> "$tmp/proj.txt"
done

echo
echo "projection, 25 Gb/s ring all-reduce (a = 25 us), weak scaling, per rank 1 core and $((B / 2)) x $T positions a step:"
printf "%-5s %12s %12s %10s %12s %10s %10s %12s %10s %10s\n" kind "S (MB)" "t_comp (ms)" "" "t_ar(8) ms" eff8 speedup8 "t_ar(64) ms" eff64 speedup64
awk '{ kind = $1; S = $2 * 4; ar = $3; st = $4; tc = st - ar;
       printf "%-5s %12.3f %12.1f %10s", kind, S / 1e6, 1000 * tc, "";
       for (i = 0; i < 2; i++) { N = i ? 64 : 8;
           t = 2 * (N - 1) / N * S / 3.125e9 + 2 * (N - 1) * 25e-6; e = tc / (tc + t);
           printf " %12.2f %10.3f %10.1f", 1000 * t, e, N * e }
       printf "\n" }' "$tmp/proj.txt"
