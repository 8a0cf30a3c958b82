#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time, two at a time (the
# machine has 2 cores): FUZZ_SECONDS each, default 60. A crash, a failed assertion, a
# timeout or an out-of-memory fails the run; the input is kept under fuzz/artifacts/<target>/
# and the command reproducing it is printed.
#
# A fresh machine has only the stable toolchain (no nightly can be downloaded), so the
# targets are built with stable and RUSTC_BOOTSTRAP=1, without a sanitizer (cargo-fuzz's
# default, AddressSanitizer, needs nightly's -Zsanitizer). .ci/install-fuzz.sh installs
# cargo-fuzz. New inputs the fuzzer finds go to a scratch directory, not the seed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never

cargo fuzz build --sanitizer none
triple=$(rustc -vV | sed -n 's/^host: //p')
bin=fuzz/target/$triple/release
work=$(mktemp -d "${TMPDIR:-/tmp}/lameduck-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

mapfile -t targets < <(cargo fuzz list)
echo "fuzzing ${targets[*]} for ${secs}s each"

run() {
    local t=$1
    mkdir -p "$work/$t" "fuzz/artifacts/$t"
    "$bin/$t" "$work/$t" "fuzz/corpus/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
        >"$work/$t.log" 2>&1
}

failed=()
for ((i = 0; i < ${#targets[@]}; i += 2)); do
    pids=()
    for t in "${targets[@]:i:2}"; do
        run "$t" &
        pids+=("$!:$t")
    done
    for p in "${pids[@]}"; do
        t=${p#*:}
        if wait "${p%%:*}"; then
            runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
            echo "fuzz $t: ok, ${runs:-?} executions in ${secs}s"
        else
            failed+=("$t")
            echo "fuzz $t: FAILED"
            tail -n 40 "$work/$t.log"
            for a in "fuzz/artifacts/$t"/*; do
                [ -e "$a" ] || continue
                echo "reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none $t $a"
            done
        fi
    done
done

[ ${#failed[@]} -eq 0 ] || echo "failed targets: ${failed[*]}"
# A closing line in the form CI reads: one per target.
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
