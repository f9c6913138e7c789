#!/bin/sh
# Run libFuzzer targets for FUZZ_SECONDS each (`make fuzz`):
#   run.sh SRCDIR BUILDDIR NAME...
# Each target starts from its seed corpus SRCDIR/tests/fuzz/corpus/NAME/
# (read only) and keeps what it finds in BUILDDIR/tests/fuzz/work/NAME/;
# crash, leak, timeout and out-of-memory inputs go to
# BUILDDIR/tests/fuzz/artifacts/NAME/ and the full log to
# BUILDDIR/tests/fuzz/NAME.log.  Prints one line per target (executions,
# coverage cov/ft from libFuzzer's final stats, failures) and exits 1 when
# any target reported a crash, leak, UBSan or timeout.
# FUZZ_FLAGS adds libFuzzer options (e.g. -jobs, -dict).
set -u
src=$1 build=$2
shift 2
secs=${FUZZ_SECONDS:-15}
# per input: at most 10 s and 2 GiB (docs/security.md, "Limits on outside input")
timeout=${FUZZ_TIMEOUT:-10}
rss=${FUZZ_RSS_MB:-2048}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
failed=0
printf '%-22s %10s %7s %7s  %s\n' target executions cov ft result
for name in "$@"; do
    bin=$build/tests/fuzz/fuzz_$name
    work=$build/tests/fuzz/work/$name
    art=$build/tests/fuzz/artifacts/$name
    log=$build/tests/fuzz/$name.log
    mkdir -p "$work" "$art"
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -timeout="$timeout" -rss_limit_mb="$rss" -print_final_stats=1 \
        -artifact_prefix="$art/" ${FUZZ_FLAGS:-} "$work" "$src/tests/fuzz/corpus/$name" >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
    cov=$(printf '%s\n' "$last" | sed -n 's/.* cov: \([0-9]*\).*/\1/p')
    ft=$(printf '%s\n' "$last" | sed -n 's/.* ft: \([0-9]*\).*/\1/p')
    found=$(find "$art" -type f | wc -l)
    if [ $rc -ne 0 ] || [ "$found" -ne 0 ] ||
        grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:' "$log"; then
        result="FAILED (exit $rc; $found input(s) in $art; log $log)"
        failed=1
    else
        result=ok
    fi
    printf '%-22s %10s %7s %7s  %s\n' "fuzz_$name" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$result"
    if [ "$result" != ok ]; then
        grep -E -A12 'ERROR: |runtime error:|SUMMARY' "$log" | head -n 40 | sed 's/^/    /'
    fi
done
exit $failed
