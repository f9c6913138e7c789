#!/bin/sh
# kill -9 at random moments of a training run, resuming after each kill.
#
# A pipeline (a tiny byte-level model with a LoRA module, dropout on, 240
# steps, a checkpoint every 2) is trained once straight through, then again
# in another directory killed with SIGKILL at KILL_COUNT (20) random moments,
# each attempt `peftref train --resume` after the last.  The interrupted run
# must end with the straight run's final losses and module bytes (cmp), no
# temporary file or lock left, and metrics.jsonl with no step twice.
#
# The moments are reproducible: KILL_SEED=N (printed; default from the
# clock) fixes them.  Run from the build directory (make check does);
# PEFTREF names the program (default ./peftref).
# Prints one line per check and a final "N passed, N failed".
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-$(dirname "$0")/..}
case $srcdir in /*) ;; *) srcdir=$(pwd)/$srcdir ;; esac
corpus=$srcdir/tests/data/train/corpus.txt
[ -f "$corpus" ] || corpus=$srcdir/data/train/corpus.txt
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
KILL_COUNT=${KILL_COUNT:-20}
# long enough that 20 kills, each after at least one new step, land before the
# end even on a loaded machine, where noticing a new step (a poll every 10 ms
# that runs sed) can take as long as 20 or 30 steps of this tiny model
STEPS=${KILL_STEPS:-720}
seed=${KILL_SEED:-$(( $(date +%s) % 100000 ))}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-kill-XXXXXX") || exit 1
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
now_ms() { date +%s%3N; }

cat > "$tmp/run.yaml" <<YAML
model:
  config: {n_layers: 1, d_model: 32, n_heads: 2, d_ff: 64, vocab: 256, max_seq: 32}
  seed: 3
modules:
  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8, dropout: 0.1}}
task:
  type: lm
  train: $corpus
  val_fraction: 0.1
train:
  steps: $STEPS
  batch: 4
  seq_len: 32
  lr: 3e-3
  warmup: 2
  checkpoint_every: 2
  eval_every: 10
  eval_batches: 2
  log_every: 0
YAML

echo "kill_resume: seed $seed (KILL_SEED=$seed reproduces the kill moments), $KILL_COUNT kills"
t0=$(now_ms)
"$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/straight" --quiet >"$tmp/straight.out" 2>"$tmp/straight.err"
check "uninterrupted run" [ $? -eq 0 ]
t1=$(now_ms)
span=$((t1 - t0))
[ $span -lt 50 ] && span=50
echo "uninterrupted run: ${span} ms"

# A small LCG, so the moments depend on the seed alone.
state=$seed
kills=0
finished_early=0
step_ms=$((span / STEPS))
[ $step_ms -lt 5 ] && step_ms=5
last_step() { sed -n 's/^{"step": \([0-9]*\), "loss".*/\1/p' "$tmp/killed/metrics.jsonl" 2>/dev/null | tail -n1; }
i=1
while [ $i -le "$KILL_COUNT" ]; do
    state=$(( (state * 1103515245 + 12345) % 2147483648 ))
    before=$(last_step)
    "$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/killed" --resume --quiet \
        >>"$tmp/killed.out" 2>>"$tmp/killed.err" &
    pid=$!
    # Wait until this attempt has trained a step beyond where the last one
    # stopped (so every kill lands in training, however slow the machine),
    # then kill it a random moment later: within the next two steps, which
    # covers the forward, backward, optimizer and checkpoint writes.
    waited=0
    while kill -0 $pid 2>/dev/null && [ "$(last_step)" = "$before" ] && [ $waited -lt 3000 ]; do
        sleep 0.01
        waited=$((waited + 1))
    done
    delay=$(( (state / 7) % (2 * step_ms + 1) ))
    sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
    if kill -9 $pid 2>/dev/null; then
        kills=$((kills + 1))
    else
        finished_early=$((finished_early + 1))
    fi
    wait $pid 2>/dev/null
    echo "  kill $i, ${delay} ms after step ${before:-none}+1: metrics at step $(last_step)"
    i=$((i + 1))
done
check "all $KILL_COUNT kills landed during training" [ "$kills" -eq "$KILL_COUNT" ]
echo "$kills kills landed, $finished_early attempts had ended before theirs"
"$PEFTREF" train "$tmp/run.yaml" --set "train.output=$tmp/killed" --resume --quiet \
    >>"$tmp/killed.out" 2>>"$tmp/killed.err"
check "last resume exits 0" [ $? -eq 0 ]

for f in "$tmp"/straight/modules/*.safetensors; do
    check "module $(basename "$f") bytes equal" cmp "$f" "$tmp/killed/modules/$(basename "$f")"
done
final() { # the last train loss and the last val loss of a run's metrics
    sed -n "s/^{\"step\": $STEPS, \"loss\": \([^,]*\),.*/\1/p; s/^{\"step\": $STEPS, \"val_loss\": \([^,]*\),.*/\1/p" "$1/metrics.jsonl" | tr '\n' ' '
}
a=$(final "$tmp/straight")
b=$(final "$tmp/killed")
echo "final losses: straight $a; killed and resumed $b"
check "final train and val loss equal" [ -n "$a" -a "$a" = "$b" ]
left=$(find "$tmp/killed" -name '*.tmp.*' -o -name '.lock' | wc -l)
check "no temporary file or lock left" [ "$left" -eq 0 ]
steps=$(sed -n 's/^{"step": \([0-9]*\), "loss".*/\1/p' "$tmp/killed/metrics.jsonl")
dups=$(printf '%s\n' "$steps" | sort -n | uniq -d | wc -l)
count=$(printf '%s\n' "$steps" | grep -c .)
check "metrics: no step twice ($dups repeated)" [ "$dups" -eq 0 ]
check "metrics: steps 1..$STEPS once each ($count lines)" [ "$count" -eq "$STEPS" ]
vdups=$(sed -n 's/^{"step": \([0-9]*\), "val_loss".*/\1/p' "$tmp/killed/metrics.jsonl" | sort -n | uniq -d | wc -l)
check "metrics: no evaluation twice" [ "$vdups" -eq 0 ]
check "metrics and loss.svg identical but for time" sh -c \
    "sed 's/, \"seconds\": [0-9.]*//' '$tmp/straight/metrics.jsonl' > '$tmp/a' &&
     sed 's/, \"seconds\": [0-9.]*//' '$tmp/killed/metrics.jsonl' > '$tmp/b' && cmp '$tmp/a' '$tmp/b'"

t2=$(now_ms)
echo "kill_resume: $((t2 - t0)) ms in all"
if [ $failed -eq 0 ] && [ -z "${PEFTREF_KILL_KEEP:-}" ]; then
    rm -rf "$tmp"
else
    echo "kept $tmp"
fi
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
