#!/usr/bin/env bash
# Builds the Argo Rollouts controller for the node tier's canary (tests/node.rs), at the
# release the README supports, from its own Go module: its go.mod and go.sum as released
# (their replace block included), so nothing is re-resolved. Its CRDs come from the same
# module's manifests/crds.
#
# Output: $LAMEDUCK_NODE_CACHE (default ~/.cache/lameduck/node)/argo-rollouts-<version>/ with
#   rollouts-controller *-crd.yaml VERSIONS
# Does nothing if that directory is already complete. Prints the directory on the last line.
set -euo pipefail
cd "$(dirname "$0")/../cluster"

ARGO_ROLLOUTS_VERSION=v1.10.1
cache="${LAMEDUCK_NODE_CACHE:-${HOME}/.cache/lameduck/node}"
out="${cache}/argo-rollouts-${ARGO_ROLLOUTS_VERSION}"
if [ -f "${out}/VERSIONS" ]; then
  echo "Argo Rollouts controller already built: ${out}" >&2
  echo "${out}"
  exit 0
fi

start=$SECONDS
mkdir -p "${cache}"
tmp="$(mktemp -d "${cache}/.build-argo.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
module="github.com/argoproj/argo-rollouts@${ARGO_ROLLOUTS_VERSION}"
dir="$(go mod download -json "${module}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
# The module cache is read-only; build in a copy.
cp -r "${dir}" "${tmp}/src"
chmod -R u+w "${tmp}/src"
echo "building the Argo Rollouts controller ${ARGO_ROLLOUTS_VERSION} ..." >&2
(
  cd "${tmp}/src"
  CGO_ENABLED=0 nice go build -trimpath \
    "-ldflags=-s -w -X github.com/argoproj/argo-rollouts/utils/version.version=${ARGO_ROLLOUTS_VERSION#v}" \
    -o "${tmp}/rollouts-controller" ./cmd/rollouts-controller
)
install -m 0644 "${dir}"/manifests/crds/*-crd.yaml "${tmp}/"
rm -rf "${tmp}/src"
printf 'argo-rollouts %s\n' "${ARGO_ROLLOUTS_VERSION}" >"${tmp}/VERSIONS"
rm -rf "${out}"
mv "${tmp}" "${out}"
trap - EXIT
echo "built argo-rollouts-${ARGO_ROLLOUTS_VERSION} in $((SECONDS - start))s" >&2
echo "${out}"
