#!/usr/bin/env bash
# Profiles lameduck next to the peers (issue 5): syscalls and TCP segments per request,
# instructions and malloc calls per request (callgrind), perf record hot spots.
#
#   bash benches/profile.sh [--requests N] [--callgrind-requests N] [--duration S] [--peers LIST]
#
# Same installs and pinning as compare.sh, plus Debian's linux-perf and valgrind. Builds a
# second lameduck with debug info in target/profiling (same code and release profile) for
# symbols. Writes benches/results/profile-<date>.md (and .json). ~10 minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LOG_DIR=${TMPDIR:-/tmp}/lameduck-bench-install
mkdir -p "$LOG_DIR"
trap 'if [[ -n "${PY_PID:-}" ]]; then kill -TERM "$PY_PID" 2>/dev/null || true; wait "$PY_PID" 2>/dev/null || true; fi' EXIT
trap 'exit 130' INT TERM

# shellcheck source=benches/tools.sh
source "$ROOT/benches/tools.sh"

if [[ "${BENCH_SKIP_INSTALL:-0}" != 1 ]]; then
    install_tools
    need=()
    command -v perf >/dev/null || need+=(linux-perf)
    command -v valgrind >/dev/null || need+=(valgrind)
    command -v nstat >/dev/null || need+=(iproute2)
    if ((${#need[@]})); then
        timed "apt-get install ${need[*]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >"$LOG_DIR/apt-prof.log" 2>&1
    fi
fi
if ! perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
    echo "perf cannot read syscall tracepoints here (perf_event_paranoid, or not root)" >&2
    exit 1
fi

t0=$SECONDS
cargo build -q --release --bin lameduck --example bench_upstream
CARGO_PROFILE_RELEASE_DEBUG=1 CARGO_PROFILE_RELEASE_STRIP=none \
    cargo build -q --release --target-dir "$ROOT/target/profiling" --bin lameduck
echo "build: release + profiling builds took $((SECONDS - t0)) s"

TOOLS=$(tools_json)
python3 "$ROOT/benches/profile.py" --tools "$TOOLS" \
    --profiling-binary "$ROOT/target/profiling/release/lameduck" "$@" &
PY_PID=$!
wait "$PY_PID"
