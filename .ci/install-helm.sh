#!/usr/bin/env bash
# Builds Helm for the chart tests (tests/chart.rs) from its Go module, at the version pinned in
# tests/helm/go.mod (checksums in tests/helm/go.sum), and links it as /usr/local/bin/helm.
# Cached by version under $LAMEDUCK_HELM_CACHE (default ~/.cache/lameduck/helm-<version>/): a
# warm run builds nothing. A cold build takes several minutes on 2 cores.
# Needs Go and the Go module proxy; nothing is downloaded from a release page.
set -euo pipefail
cd "$(dirname "$0")/../tests/helm"

if ! command -v go >/dev/null; then
  echo "install-helm: go not found; the chart tests need it to build helm" >&2
  exit 1
fi

version="$(go list -m -f '{{.Version}}' helm.sh/helm/v3)"
cache="${LAMEDUCK_HELM_CACHE:-${HOME}/.cache/lameduck}/helm-${version}"
bin_dir="${LAMEDUCK_TOOLS_BIN:-/usr/local/bin}"

if ! [ -x "${cache}/helm" ]; then
  start=$SECONDS
  mkdir -p "${cache}"
  tmp="$(mktemp "${cache}/.helm.XXXXXX")"
  trap 'rm -f "${tmp}"' EXIT
  echo "install-helm: building helm ${version} ..." >&2
  # Stamped as Helm's Makefile does: go build alone reports only the minor version, and
  # `helm template` would assume Kubernetes 1.20 instead of the client-go it is built with.
  k8s="$(go list -m -f '{{.Version}}' k8s.io/client-go)"  # v0.34.2 -> Kubernetes 1.34
  k8s_minor="${k8s#v0.}"
  k8s_minor="${k8s_minor%%.*}"
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${version}"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in pkg/lint/rules pkg/chartutil; do
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMajor=1"
    ldflags+=" -X helm.sh/helm/v3/${pkg}.k8sVersionMinor=${k8s_minor}"
  done
  CGO_ENABLED=0 nice go build -trimpath "-ldflags=${ldflags}" -o "${tmp}" \
    helm.sh/helm/v3/cmd/helm
  chmod 0755 "${tmp}"
  mv "${tmp}" "${cache}/helm"
  trap - EXIT
  echo "install-helm: built helm ${version} in $((SECONDS - start))s" >&2
fi

mkdir -p "${bin_dir}"
ln -sfn "${cache}/helm" "${bin_dir}/helm"
echo "install-helm: $("${bin_dir}/helm" version --short)"
