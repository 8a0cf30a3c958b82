#!/usr/bin/env bash
# Builds the control plane of the cluster tests (tests/cluster.rs): etcd, kube-apiserver and
# kube-controller-manager from the Go modules pinned in tests/cluster/go.mod, plus the Argo
# Rollouts CRD. Cached under ~/.cache/lameduck/cluster by version: a warm run does nothing.
# Needs Go (installed on this kind of machine) and the Go module proxy.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null; then
  echo "install-cluster: go not found; the cluster tests need it to build the control plane" >&2
  exit 1
fi
bash tests/cluster/build.sh
