#!/usr/bin/env bash
# Installs promtool for the observability tests (tests/observability.rs): it checks and
# unit-tests the alerting rules of k8s/observability/prometheusrule.yaml. It comes with
# Debian's `prometheus` package; the server itself is not started (no init system runs it
# here, and policy-rc.d forbids starting it during the install).
# Idempotent, non-interactive, runs as root.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if ! command -v promtool >/dev/null; then
  policy=/usr/sbin/policy-rc.d
  created=
  if ! [ -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created=1
  fi
  if ! apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  if [ -n "$created" ]; then rm -f "$policy"; fi
fi
echo "install-promtool: $(promtool --version 2>&1 | head -1)"
