#!/usr/bin/env bash
# Node.js for tests/robustness.rs: its built-in `http2` client is the real client the drain
# must not lose requests of (`tests/support/node/h2client.js`). Debian's `nodejs` package
# (any Node >= 18 has `node:http2`); the tests run /usr/bin/node, or $LAMEDUCK_NODE.
# Idempotent, non-interactive, runs as root.
set -euo pipefail
if /usr/bin/node --version >/dev/null 2>&1; then
  echo "install-nodejs: $(/usr/bin/node --version) already at /usr/bin/node"
  exit 0
fi
apt-get install -y -qq --no-install-recommends nodejs >/dev/null
echo "install-nodejs: $(/usr/bin/node --version) at /usr/bin/node"
