#!/bin/sh
# Before/after row for the backward that stops at the lowest trainable block,
# the row small-skipbw-T256 of `make bench` (bench/bench_train.c): GPT-2-small
# shape, B=4, T=256, LoRA r=8 on qkv of the top 4 of 12 layers, timed with
# the full backward (PEFTREF_BACKWARD_ALL=1, "before") and without ("after"),
# and whether the trained LoRA tensors are bit-identical.  Runs that row
# alone, without PyTorch, in a temporary work directory.
#   sh bench/skip_backward.sh [BUILD_DIR] [bench_train options, e.g. --quick]
set -eu
BUILD=$(cd "${1:-build}" && pwd)
[ $# -gt 0 ] && shift
SRC=$(cd "$(dirname "$0")/.." && pwd)
export PEFTREF_PLUGIN_PATH=$BUILD/plugins/.libs
make -C "$BUILD" bench/bench_train >/dev/null
work=$(mktemp -d "${TMPDIR:-/tmp}/peftref-skipbw-bench-XXXXXX")
trap 'rm -rf "$work"' EXIT
"$BUILD/bench/bench_train" --srcdir "$SRC" --peftref "$BUILD/peftref" --workdir "$work" \
    --only small-skipbw --no-torch "$@"
