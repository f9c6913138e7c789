#!/bin/sh
# train.accum: 2 with the same global batch (4 rows x 2 micro-batches
# against 8 rows x 1) gives the same per-step losses within 1e-5 relative
# over 20 steps, for LoRA on text and for a composition with dropout
# (LoRA dropout, (IA)^3, BitFit) on prompt/completion records whose
# micro-batches score different numbers of targets.  Run from the build
# directory (make check does).
. "$(dirname "$0")/mpi_lib.sh"
make_pc_data "$tmp/pc.jsonl"
for kind in lora mix; do
    data=$corpus
    [ $kind = mix ] && data=$tmp/pc.jsonl
    write_pipeline "$tmp/$kind.yaml" $kind "$data"
    "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-b8" --quiet >/dev/null
    check "$kind: batch 8 trains" [ $? -eq 0 ]
    "$PEFTREF" train "$tmp/$kind.yaml" --set "train.output=$tmp/$kind-b4a2" --set train.batch=4 \
        --set train.accum=2 --quiet >/dev/null
    check "$kind: batch 4 x accum 2 trains" [ $? -eq 0 ]
    check "$kind: accum 2 = no accumulation, 20 steps within 1e-5" \
        same_losses "$tmp/$kind-b8/metrics.jsonl" "$tmp/$kind-b4a2/metrics.jsonl" 20
done
finish
