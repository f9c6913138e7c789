#!/bin/sh
# peftref compare, interrupted and resumed.
#
# A comparison of two arms (a tiny byte-level model, a few hundred steps)
# runs once straight through.  Then again in another directory, stopped
# while its second arm trains: by SIGINT to the compare process alone
# (which must forward it, so the arm checkpoints, and exit 130 telling how
# to resume), and in a third directory by SIGKILL of the compare process.
# `peftref compare --resume` must then end with the straight run's task
# figures (val loss and perplexity of every row; timings excluded), reuse
# the first arm without training it again (its log line, its result file
# untouched) and continue the second from its checkpoint.
# Run from the build directory (make check does); PEFTREF names the program.
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-$(dirname "$0")/..}
case $srcdir in /*) ;; *) srcdir=$(pwd)/$srcdir ;; esac
corpus=$srcdir/tests/data/train/corpus.txt
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-cmpkill-XXXXXX") || exit 1
passed=0
failed=0
check() { # check NAME COMMAND...
    name=$1
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
    fi
}

cat > "$tmp/arms.yaml" <<YAML
model:
  config: {n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, max_seq: 32}
  seed: 3
task: {type: lm, train: $corpus, val_fraction: 0.1}
train: {steps: ${CMP_STEPS:-400}, batch: 4, seq_len: 32, lr: 3e-3, eval_every: 100, eval_batches: 2}
compare:
  arms:
    - name: first
      modules: [{technique: bitfit}]
    - name: second
      modules: [{technique: lora, sites: [q, v], options: {r: 4, dropout: 0.1}}]
YAML

# the task figures of every row, one line each (timings left out)
figures() {
    sed -n 's/.*"arm": "\([^"]*\)".*/\1/p; s/.*"val_loss": \([-0-9.e+]*\).*/\1/p; s/.*"val_perplexity": \([-0-9.e+]*\).*/\1/p' "$1"
}
# wait (at most 60 s) until the second arm has trained some steps
wait_second_arm() {
    i=0
    while [ $i -lt 600 ]; do
        grep -q '"loss"' "$1/arms/second/metrics.jsonl" 2>/dev/null && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}
# wait until no process holds the arm's lock
wait_unlocked() {
    i=0
    while [ -e "$1/arms/second/.lock" ] && [ $i -lt 300 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ ! -e "$1/arms/second/.lock" ]
}
mtime() { stat -c %Y.%y "$1" 2>/dev/null; }

"$PEFTREF" compare "$tmp/arms.yaml" --out "$tmp/straight" --progress none >/dev/null 2>"$tmp/straight.err"
check "uninterrupted comparison" [ $? -eq 0 ]
figures "$tmp/straight/table.json" >"$tmp/straight.fig"
check "the figures are there" [ "$(wc -l <"$tmp/straight.fig")" -ge 9 ]

for how in INT KILL; do
    out=$tmp/$how
    "$PEFTREF" compare "$tmp/arms.yaml" --out "$out" --progress none >/dev/null 2>"$out.err" &
    pid=$!
    wait_second_arm "$out"
    check "$how: the second arm started" [ $? -eq 0 ]
    first_result=$(mtime "$out/arms/first/compare_result.json")
    kill -s "$how" "$pid"
    wait "$pid"
    status=$?
    if [ "$how" = INT ]; then
        check "INT: compare exits 130" [ $status -eq 130 ]
        check "INT: it says how to resume" grep -q -- "--out $out --resume" "$out.err"
    else
        check "KILL: compare was killed" [ $status -eq 137 ]
    fi
    wait_unlocked "$out"
    check "$how: the arm stopped with a checkpoint" [ -f "$out/arms/second/checkpoint.safetensors" ]
    check "$how: the arm did not finish" [ ! -f "$out/arms/second/compare_result.json" ]
    "$PEFTREF" compare "$tmp/arms.yaml" --out "$out" --progress none >/dev/null 2>"$out.refused"
    check "$how: a re-run without --resume is refused" [ $? -eq 1 ]
    "$PEFTREF" compare "$tmp/arms.yaml" --out "$out" --resume --progress none >/dev/null 2>"$out.resume.err"
    check "$how: --resume finishes" [ $? -eq 0 ]
    check "$how: the first arm is reused" grep -q "arm 1/2: first ... finished earlier: reused" "$out.resume.err"
    check "$how: its result is untouched" [ "$(mtime "$out/arms/first/compare_result.json")" = "$first_result" ]
    check "$how: the second arm continued" grep -q '"step"' "$out/arms/second/metrics.jsonl"
    figures "$out/table.json" >"$out.fig"
    check "$how: the same table as the uninterrupted run" cmp -s "$tmp/straight.fig" "$out.fig"
done

echo "$passed passed, $failed failed"
[ $failed -eq 0 ] && rm -rf "$tmp"
[ $failed -eq 0 ]
