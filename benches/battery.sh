#!/usr/bin/env bash
# Issue 10's attack battery against the release binary, on 127.0.0.1 only:
#
#   bash benches/battery.sh [--soak S] [--only CASE ...]
#
# Builds `lameduck` in release, then runs benches/battery.py (Python 3 standard library),
# which starts the proxy and a small app on ephemeral ports, runs every case (each bounded
# in connections, frames and seconds; about two minutes with the default 60 s soak), prints
# the table in Markdown and writes it to benches/results/battery-<date>.md. Exits 1 when a
# case fails. Needs prlimit (util-linux) for the fd-exhaustion case.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v prlimit >/dev/null || { echo "battery: prlimit (util-linux) not found" >&2; exit 2; }
cargo build -q --release --locked --bin lameduck
exec python3 benches/battery.py --bin target/release/lameduck "$@"
