#!/bin/sh
# Data parallelism: `mpirun -np 2 peftref train` with global batch 8 gives
# the per-step losses of one process with batch 8, within 1e-5 relative
# over 20 steps, for LoRA on text and for a composition with dropout
# (LoRA dropout, (IA)^3, BitFit) on prompt/completion records of varied
# lengths; so does 2 ranks x accum 2 with 4 rows per micro-batch.  Rank 0
# alone writes: the outputs are one run's, and the final modules equal
# the single process's to within the same tolerance (the final val_loss).
# Skips (77) when peftref was built without MPI or mpirun is missing.
. "$(dirname "$0")/mpi_lib.sh"
skip_without_mpi
"$PEFTREF" runtime | grep -q "^mpi: 1 rank$"
check "peftref runtime run directly: mpi: 1 rank" [ $? -eq 0 ]
$MPIRUN -np 2 "$PEFTREF" runtime > "$tmp/rt.txt" 2>&1
check "peftref runtime under mpirun -np 2: one 'mpi: 2 ranks, 1 thread each' line" \
    [ "$(grep -c '^mpi: 2 ranks, 1 thread each$' "$tmp/rt.txt")" -eq 1 ]
make_pc_data "$tmp/pc.jsonl"
for kind in lora mix; do
    data=$corpus
    [ $kind = mix ] && data=$tmp/pc.jsonl
    write_pipeline "$tmp/$kind.yaml" $kind "$data"
    "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-one" --quiet > "$tmp/$kind-one.out"
    check "$kind: one process trains" [ $? -eq 0 ]
    $MPIRUN -np 2 "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-two" --progress plain \
        > "$tmp/$kind-two.out" 2> "$tmp/$kind-two.err"
    check "$kind: 2 ranks train" [ $? -eq 0 ]
    check "$kind: the run's first line states the layout" \
        grep -q "^peftref train: blas: .*; mpi: 2 ranks, 1 thread each$" "$tmp/$kind-two.err"
    check "$kind: 2 ranks = 1 process, 20 steps within 1e-5" \
        same_losses "$tmp/$kind-one/metrics.jsonl" "$tmp/$kind-two/metrics.jsonl" 20
    check "$kind: one result line (rank 0 alone prints)" [ "$(grep -c '^steps 20 ' "$tmp/$kind-two.out")" -eq 1 ]
    check "$kind: one metrics line per step and evaluation (rank 0 alone writes)" \
        [ "$(grep -c '"step"' "$tmp/$kind-two/metrics.jsonl")" -eq "$(grep -c '"step"' "$tmp/$kind-one/metrics.jsonl")" ]
    check "$kind: the same outputs as one process" \
        [ "$(cd "$tmp/$kind-two" && ls -A | sort)" = "$(cd "$tmp/$kind-one" && ls -A | sort)" ]
    v1=$(sed -n 's/.*val_loss \([0-9.]*\) -> \([0-9.]*\).*/\2/p' "$tmp/$kind-one.out")
    v2=$(sed -n 's/.*val_loss \([0-9.]*\) -> \([0-9.]*\).*/\2/p' "$tmp/$kind-two.out")
    check "$kind: sharded validation: final val_loss $v2 = $v1 within 1e-5" \
        awk -v a="$v1" -v b="$v2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a > 0 && d <= 1e-5 * a) }'
done
$MPIRUN -np 2 "$PEFTREF" train "$tmp/mix.yaml" --set "train.output=$tmp/mix-two-a2" --set train.accum=2 \
    --set train.batch=4 --quiet > /dev/null
check "mix: 2 ranks x accum 2 x 2 rows train" [ $? -eq 0 ]
check "mix: 2 ranks x accum 2 = 1 process batch 8, 20 steps within 1e-5" \
    same_losses "$tmp/mix-one/metrics.jsonl" "$tmp/mix-two-a2/metrics.jsonl" 20
$MPIRUN -np 3 "$PEFTREF" train "$tmp/mix.yaml" --set "train.output=$tmp/mix-three" --quiet > "$tmp/three.out" 2>&1
check "batch 8 over 3 ranks is refused, naming train.batch" \
    grep -q "train.batch 8 does not split evenly over 3 ranks" "$tmp/three.out"
finish
