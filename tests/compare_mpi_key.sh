#!/bin/sh
# compare.mpi_ranks as the pipeline checker sees it (no MPI needed):
# `peftref plan` shows it, and a value that is not a whole number from 1
# to 4096 is an error at its FILE:LINE:COL naming the key; mpi_ranks: 1
# is the single-process compare (the table's figures equal the key's
# absence exactly).
set -u
PEFTREF=${PEFTREF:-./peftref}
srcdir=${srcdir:-$(dirname "$0")/..}
case $srcdir in /*) ;; *) srcdir=$(pwd)/$srcdir ;; esac
corpus=$srcdir/tests/data/train/corpus.txt
PEFTREF_PLUGIN_PATH=${PEFTREF_PLUGIN_PATH:-$(pwd)/plugins/.libs}
export PEFTREF_PLUGIN_PATH OPENBLAS_NUM_THREADS=1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/peftref-mpikey-XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
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
write() { # write FILE VALUE
    cat > "$1" <<YAML
model: {preset: gpt2-tiny}
task: {type: lm, train: $corpus, val_fraction: 0.1}
train: {steps: 4, batch: 4, seq_len: 16, lr: 3e-3, eval_batches: 1}
compare:
  mpi_ranks: $2
  arms:
    - modules: [{technique: bitfit}]
YAML
}
for bad in 0 -2 1.5 many 4097 "[2]"; do
    write "$tmp/bad.yaml" "$bad"
    "$PEFTREF" plan "$tmp/bad.yaml" > /dev/null 2> "$tmp/bad.err"
    st=$?
    check "mpi_ranks: $bad is refused at bad.yaml:5:14 naming compare.mpi_ranks (status $st)" \
        [ $st -ne 0 ] && grep -q "bad.yaml:5:14: .*compare.mpi_ranks" "$tmp/bad.err"
done
write "$tmp/bad.yaml" 0
"$PEFTREF" compare "$tmp/bad.yaml" > /dev/null 2> "$tmp/cmp.err"
check "peftref compare refuses it the same way" grep -q "bad.yaml:5:14: .*compare.mpi_ranks" "$tmp/cmp.err"
write "$tmp/two.yaml" 2
"$PEFTREF" plan "$tmp/two.yaml" > "$tmp/plan2.txt" 2>&1
check "plan shows mpi_ranks: 2" grep -q "each arm trains on 2 MPI ranks (compare.mpi_ranks: mpirun -np 2 peftref train)" \
    "$tmp/plan2.txt"
"$PEFTREF" plan "$tmp/two.yaml" --set compare.mpi_ranks=3 > "$tmp/plan3.txt" 2>&1
check "--set compare.mpi_ranks=3 overrides it" grep -q "each arm trains on 3 MPI ranks" "$tmp/plan3.txt"
if "$PEFTREF" runtime | grep -q "^mpi: not built"; then
    "$PEFTREF" compare "$tmp/two.yaml" --quiet > /dev/null 2> "$tmp/nompi.err"
    check "without MPI, mpi_ranks: 2 is refused naming the key" \
        grep -q "two.yaml:5:14: compare.mpi_ranks: 2 trains each arm under mpirun -np 2, but peftref was built without MPI" \
        "$tmp/nompi.err"
else
    PEFTREF_MPIRUN=no-such-mpirun "$PEFTREF" compare "$tmp/two.yaml" --quiet > /dev/null 2> "$tmp/nompi.err"
    check "without a launcher, mpi_ranks: 2 is refused naming the key" \
        grep -q "two.yaml:5:14: compare.mpi_ranks: 2 trains each arm under mpirun -np 2, but no-such-mpirun is not on PATH" \
        "$tmp/nompi.err"
fi
write "$tmp/one.yaml" 1
"$PEFTREF" plan "$tmp/one.yaml" > "$tmp/plan1.txt" 2>&1
check "plan shows mpi_ranks: 1" grep -q "each arm trains in one process (compare.mpi_ranks: 1)" "$tmp/plan1.txt"
"$PEFTREF" compare "$tmp/one.yaml" --format csv --quiet > "$tmp/one.csv"
check "mpi_ranks: 1 compares in one process" [ $? -eq 0 ]
sed '/mpi_ranks/d' "$tmp/one.yaml" > "$tmp/none.yaml"
"$PEFTREF" compare "$tmp/none.yaml" --format csv --quiet > "$tmp/none.csv"
check "mpi_ranks: 1 = no key: the same val losses" \
    [ "$(cut -d, -f1,3,11,12 "$tmp/one.csv")" = "$(cut -d, -f1,3,11,12 "$tmp/none.csv")" ]
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
