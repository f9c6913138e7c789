#!/bin/sh
# peftref compare over MPI, both ways (docs/distributed.md, "Comparing
# arms"):
# - compare.mpi_ranks: 2 trains every arm with `mpirun -np 2 peftref
#   train`: each arm's validation losses (the final one and every
#   evaluation of its curve, for LoRA with dropout, for BitFit, and for
#   both settings of a BitFit learning-rate sweep) equal mpi_ranks: 1's
#   within 1e-5 relative, the trainable counts exactly; --resume reuses
#   the finished arms; SIGINT stops an arm (exit 130) and --resume then
#   reaches the uninterrupted figures;
# - `mpirun -np 2 peftref compare` runs the arms side by side, one per
#   rank, and rank 0's table has the plain compare's values (trainable
#   counts, validation loss and perplexity; timings and memory excluded);
# - mpi_ranks: 2 in a compare under mpirun, and mpi_ranks: 2 without a
#   launcher, are refused naming the key.
# Skips (77) when peftref was built without MPI or mpirun is missing.
. "$(dirname "$0")/mpi_lib.sh"
skip_without_mpi
export PEFTREF_MPIRUN="mpirun --oversubscribe --allow-run-as-root"
steps=${CMP_STEPS:-10}
cat > "$tmp/arms.yaml" <<YAML
model: {preset: gpt2-tiny}
task: {type: lm, train: $corpus, val_fraction: 0.1}
train: {steps: $steps, batch: 4, seq_len: 32, lr: 3e-3, eval_every: 5, eval_batches: 2}
compare:
  mpi_ranks: 2
  arms:
    - name: lora
      modules: [{technique: lora, sites: [q, v], options: {r: 4, alpha: 8, dropout: 0.1}}]
    - name: bitfit
      modules: [{technique: bitfit}]
      sweep: {train.lr: [1e-3, 3e-3]}
YAML

# figures FILE.csv: "arm trainable val_loss val_perplexity" per row
figures() {
    awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
             { print $c["arm"], $c["trainable_params"], $c["val_loss"], $c["val_perplexity"] }' "$1"
}
# curve DIR: "step val_loss" of every evaluation of a run
curve() {
    sed -n 's/^{"step": \([0-9]*\), "val_loss": \([0-9.eE+-]*\).*/\1 \2/p' "$1/metrics.jsonl"
}
# same A B: the same lines, numbers within 1e-5 relative, other words equal
same() {
    paste -d'|' "$1" "$2" | awk -F'|' '
        { n++; na = split($1, a, " "); nb = split($2, b, " "); if (na != nb || na == 0) bad = 1
          for (i = 1; i <= na; i++) {
              if (a[i] ~ /^-?[0-9.]+([eE][-+]?[0-9]+)?$/ && b[i] ~ /^-?[0-9.]+([eE][-+]?[0-9]+)?$/) {
                  d = a[i] - b[i]; if (d < 0) d = -d; s = a[i] < 0 ? -a[i] : a[i]
                  r = s > 0 ? d / s : d; if (r > worst) worst = r; if (r > 1e-5) bad = 1
              } else if (a[i] != b[i]) bad = 1 } }
        END { printf "     %d lines, largest relative difference %.3g\n", n, worst; exit !(n > 0 && !bad) }'
}
# wait (at most 60 s) until run DIR has written its first checkpoint
wait_checkpoint() {
    i=0
    while [ $i -lt 600 ]; do
        [ -f "$1/checkpoint.safetensors" ] && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

"$PEFTREF" plan "$tmp/arms.yaml" > "$tmp/plan.txt"
check "peftref plan shows compare.mpi_ranks" grep -q "each arm trains on 2 MPI ranks" "$tmp/plan.txt"

# ---- each arm under mpirun -np 2 against one process ----
"$PEFTREF" compare "$tmp/arms.yaml" --set compare.mpi_ranks=1 --out "$tmp/one" --quiet > /dev/null
check "mpi_ranks: 1 compares" [ $? -eq 0 ]
"$PEFTREF" compare "$tmp/arms.yaml" --out "$tmp/two" > /dev/null 2> "$tmp/two.err"
check "mpi_ranks: 2 compares" [ $? -eq 0 ]
figures "$tmp/one/table.csv" > "$tmp/one.fig"
figures "$tmp/two/table.csv" > "$tmp/two.fig"
check "mpi_ranks: 2 = 1: every row's trainable count, val loss and perplexity" same "$tmp/one.fig" "$tmp/two.fig"
for run in lora bitfit/p0 bitfit/p1; do
    curve "$tmp/one/arms/$run" > "$tmp/c1.txt"
    curve "$tmp/two/arms/$run" > "$tmp/c2.txt"
    check "mpi_ranks: 2 = 1: $run's validation curve ($(wc -l < "$tmp/c1.txt") evaluations)" \
        same "$tmp/c1.txt" "$tmp/c2.txt"
done
# a sweep's table without its timings: setting, best, status, seeds, losses
sweep() {
    cut -d, -f1-8 "$1" | tr ',' ' ' > "$2"
}
sweep "$tmp/one/sweeps/bitfit.csv" "$tmp/sw1.txt"
sweep "$tmp/two/sweeps/bitfit.csv" "$tmp/sw2.txt"
check "mpi_ranks: 2 = 1: bitfit's sweep table (both settings, the same one chosen)" same "$tmp/sw1.txt" "$tmp/sw2.txt"
check "the arms trained on 2 ranks (their results say so)" \
    grep -q '"ranks": 2' "$tmp/two/arms/lora/mpi_result.json"
check "the ranks wrote one run per arm (modules, pipeline.yaml, one metrics line per step)" \
    [ -f "$tmp/two/arms/lora/pipeline.yaml" ] && \
    [ "$(grep -c '"loss"' "$tmp/two/arms/lora/metrics.jsonl")" -eq "$steps" ]
check "no rank's stdout in the table (a header, the base and 2 arms)" [ "$(grep -c . "$tmp/two/table.csv")" -eq 4 ]
"$PEFTREF" compare "$tmp/arms.yaml" --out "$tmp/two" --resume > "$tmp/two-r.txt" 2> "$tmp/two-r.err"
check "--resume reuses the finished MPI arms" [ $? -eq 0 ] && \
    [ "$(grep -c 'finished earlier: reused' "$tmp/two-r.err")" -eq 3 ]

# ---- SIGINT while an MPI arm trains, then --resume ----
cat > "$tmp/long.yaml" <<YAML
model: {preset: gpt2-tiny}
task: {type: lm, train: $corpus, val_fraction: 0.1}
train: {steps: 2000, batch: 4, seq_len: 32, lr: 3e-3, eval_every: 500, eval_batches: 2, checkpoint_every: 50}
compare:
  mpi_ranks: 2
  arms:
    - name: lora
      modules: [{technique: lora, sites: [q, v], options: {r: 4}}]
YAML
"$PEFTREF" compare "$tmp/long.yaml" --out "$tmp/straight" --quiet > /dev/null
check "the 2000-step MPI arm runs straight through" [ $? -eq 0 ]
"$PEFTREF" compare "$tmp/long.yaml" --out "$tmp/stopped" --quiet > /dev/null 2> "$tmp/stopped.err" &
pid=$!
wait_checkpoint "$tmp/stopped/arms/lora"
kill -INT $pid
wait $pid
st=$?
check "SIGINT ends the compare with 130 (got $st)" [ $st -eq 130 ]
check "its message says how to resume" grep -q -- "--resume" "$tmp/stopped.err"
"$PEFTREF" compare "$tmp/long.yaml" --out "$tmp/stopped" --resume --quiet > /dev/null 2> "$tmp/resumed.err"
check "--resume finishes it" [ $? -eq 0 ]
timed=$(sed -n 's/.*"steps_timed": \([0-9]*\).*/\1/p' "$tmp/stopped/arms/lora/mpi_result.json")
check "it continued from a checkpoint (trained $timed of 2000 steps after the resume)" [ "${timed:-2000}" -lt 2000 ]
figures "$tmp/straight/table.csv" > "$tmp/s.fig"
figures "$tmp/stopped/table.csv" > "$tmp/r.fig"
check "resumed = uninterrupted: val loss and perplexity" same "$tmp/s.fig" "$tmp/r.fig"

# ---- arms side by side: mpirun -np 2 peftref compare ----
$MPIRUN -np 2 -x PEFTREF_MPIRUN "$PEFTREF" compare "$tmp/arms.yaml" --set compare.mpi_ranks=1 --out "$tmp/side" \
    > "$tmp/side.txt" 2> "$tmp/side.err"
check "mpirun -np 2 peftref compare runs" [ $? -eq 0 ]
check "rank 0 alone prints the table (one header line)" [ "$(grep -c '^arm ' "$tmp/side.txt")" -eq 1 ]
check "both ranks trained runs" grep -q "^rank 1: arm 1/2: lora ... done" "$tmp/side.err"
figures "$tmp/side/table.csv" > "$tmp/side.fig"
check "side by side = plain compare: every row's trainable count, val loss and perplexity" \
    same "$tmp/one.fig" "$tmp/side.fig"
sweep "$tmp/side/sweeps/bitfit.csv" "$tmp/sw3.txt"
check "side by side = plain compare: bitfit's sweep table" same "$tmp/sw1.txt" "$tmp/sw3.txt"
awk -F, 'NR > 1 && $0 !~ /^base/ { if ($0 ~ /,ok,/) n++ } END { exit n != 2 }' "$tmp/side/table.csv"
check "the table's rows are ok" [ $? -eq 0 ]
$MPIRUN -np 2 "$PEFTREF" compare "$tmp/arms.yaml" --set compare.mpi_ranks=1 --quiet > /dev/null 2> "$tmp/side-nout.err"
check "side by side without --out (each rank its own temporary directory)" [ $? -eq 0 ]

# ---- refusals naming the key ----
$MPIRUN -np 2 -x PEFTREF_MPIRUN "$PEFTREF" compare "$tmp/arms.yaml" --quiet > /dev/null 2> "$tmp/nested.err"
check "mpi_ranks: 2 under mpirun is refused" [ $? -ne 0 ] && \
    grep -q "arms.yaml:5:14: compare.mpi_ranks: 2 trains each arm under mpirun -np 2, but this compare runs under mpirun" \
        "$tmp/nested.err"
PEFTREF_MPIRUN=no-such-mpirun "$PEFTREF" compare "$tmp/arms.yaml" --quiet > /dev/null 2> "$tmp/nolaunch.err"
check "mpi_ranks: 2 without a launcher is refused" [ $? -eq 1 ] && \
    grep -q "arms.yaml:5:14: compare.mpi_ranks: 2 .*no-such-mpirun is not on PATH" "$tmp/nolaunch.err"
finish
