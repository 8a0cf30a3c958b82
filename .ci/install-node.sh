#!/usr/bin/env bash
# The node tier (tests/node.rs): a real kubelet, kube-scheduler, kube-proxy, containerd, runc,
# the CNI plugins and HAProxy. containerd, runc, the CNI plugins, HAProxy, iptables (kube-proxy's
# rules, inside the node's network namespace), iproute2 and gcc (the static pause and test
# app) come from Debian; the kubelet, kube-scheduler and kube-proxy are built from the
# k8s.io/kubernetes module pinned in tests/cluster/go.mod (tests/node/build.sh),
# cached under ~/.cache/lameduck/node by version: a warm run does nothing but check. The Argo
# Rollouts controller (the canary) is built from its own Go module (tests/node/build-argo.sh).
# Run after .ci/install-cluster.sh (it fills the Go module and build caches this reuses).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(containerd runc containernetworking-plugins haproxy iptables iproute2 gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-node: apt-get install ${missing[*]}" >&2
  # Installed, never started: the tests run their own containerd and HAProxy. policy-rc.d
  # keeps the packages' init scripts from starting the system's copies.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v go >/dev/null; then
  echo "install-node: go not found; the node tests need it to build the kubelet" >&2
  exit 1
fi
bash tests/node/build.sh
# The Argo Rollouts controller for the canary scenarios (its own module: ~170 s cold).
bash tests/node/build-argo.sh
