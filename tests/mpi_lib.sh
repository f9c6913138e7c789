# Shared by tests/accum_equivalence.sh, tests/mpi_train.sh and
# tests/mpi_kill_resume.sh (sourced): paths, checks, pipelines and the
# per-step loss comparison.
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-$(dirname "$0")/..}
case $srcdir in /*) ;; *) srcdir=$(pwd)/$srcdir ;; esac
corpus=$srcdir/tests/data/train/corpus.txt
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH
# one BLAS thread per rank: two ranks on a 2-core machine must not oversubscribe it
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-mpi-XXXXXX") || exit 1
[ -n "${KEEP_TMP:-}" ] || trap 'rm -rf "$tmp"' EXIT
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
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}
MPIRUN="mpirun --oversubscribe --allow-run-as-root -x PEFTREF_PLUGIN_PATH -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS"

# skip_without_mpi: exit 77 (skipped) with the reason when peftref was
# built without MPI or mpirun is missing.
skip_without_mpi() {
    if "$PEFTREF" runtime | grep -q "^mpi: not built"; then
        echo "SKIP: peftref was built without MPI (configure found no mpicc or MPI library; install libopenmpi-dev openmpi-bin)"
        exit 77
    fi
    if ! command -v mpirun >/dev/null 2>&1; then
        echo "SKIP: mpirun is not installed (apt-get install openmpi-bin)"
        exit 77
    fi
}

# Prompt and completion records of varied lengths, so the micro-batches and
# the ranks' slices score different numbers of targets.
make_pc_data() { # make_pc_data FILE
    awk 'length($0) > 8 { p = 2 + NR % 7; c = 3 + (NR * 5) % 19;
         s = substr($0, 1, p + c); gsub(/\\/, "", s); gsub(/"/, "", s);
         printf "{\"prompt\": \"%s\", \"completion\": \"%s\"}\n", substr(s, 1, p), substr(s, p + 1) }' \
        "$corpus" | head -n 96 > "$1"
}

# write_pipeline FILE KIND DATA: KIND lora (LoRA on q, v) or mix (LoRA with
# dropout 0.1, (IA)^3 and BitFit composed).
write_pipeline() {
    case $2 in
    lora) mods="  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8}}" ;;
    mix) mods="  - {technique: lora, sites: [q, v], options: {r: 4, alpha: 8, dropout: 0.1}}
  - {technique: ia3}
  - {technique: bitfit}" ;;
    esac
    cat > "$1" <<YAML
model: {preset: gpt2-tiny}
modules:
$mods
task: {type: lm, train: $3, val_fraction: 0.1}
train: {steps: 20, batch: 8, seq_len: 32, lr: 3e-3, warmup: 2, log_every: 0, eval_every: 10, eval_batches: 2}
YAML
}

# losses METRICS: "step loss" per training step
losses() {
    sed -n 's/^{"step": \([0-9]*\), "loss": \([0-9.eE+-]*\),.*/\1 \2/p' "$1"
}

# same_losses A B STEPS: both have STEPS steps whose losses agree within
# 1e-5 relative; prints the largest relative difference.
same_losses() {
    losses "$1" > "$tmp/a.txt"
    losses "$2" > "$tmp/b.txt"
    paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | awk -v want="$3" '
        { n++; if ($1 != $3) bad = 1; d = $2 - $4; if (d < 0) d = -d; r = d / ($4 < 0 ? -$4 : $4);
          if (r > worst) worst = r; if (r > 1e-5) bad = 1 }
        END { printf "     %d steps, largest relative difference %.3g\n", n, worst;
              exit !(n == want && !bad) }'
}
