#!/usr/bin/env bash
# Builds the control plane the cluster tests (tests/cluster.rs) run against: etcd,
# kube-apiserver and kube-controller-manager, from the Go modules pinned in ./go.mod, plus the
# Argo Rollouts and cert-manager CRDs from their Go modules. Everything comes from the Go
# module proxy.
#
# Output: $LAMEDUCK_CLUSTER_CACHE (default ~/.cache/lameduck/cluster)/<key>/ with
#   etcd kube-apiserver kube-controller-manager rollout-crd.yaml
#   cert-manager-issuers-crd.yaml cert-manager-certificates-crd.yaml VERSIONS
# where <key> names the pinned versions. Does nothing if that directory is already complete.
# Prints the directory on the last line of stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

# The Argo Rollouts release whose CRD the tests install: the newest the installed Go (1.26.8)
# may download (v1.9.3 and v1.10.2 declare go >= 1.26.10). Its Rollout CRD knows
# `restartPolicy` on init containers (native sidecars), as every release since v1.7.0 does;
# v1.6.x's CRD prunes it.
ARGO_ROLLOUTS_VERSION=v1.10.1
# cert-manager, for its Issuer and Certificate CRDs (the schemas k8s/webhook/certificate.yaml
# is checked against; no cert-manager controller runs).
CERT_MANAGER_VERSION=v1.21.2

mod_version() { go list -m -f '{{.Version}}' "$1"; }
k8s="$(mod_version k8s.io/kubernetes)"
etcd="$(mod_version go.etcd.io/etcd/server/v3)"
key="k8s-${k8s}-etcd-${etcd}-argo-rollouts-${ARGO_ROLLOUTS_VERSION}-cert-manager-${CERT_MANAGER_VERSION}"
cache="${LAMEDUCK_CLUSTER_CACHE:-${HOME}/.cache/lameduck/cluster}"
out="${cache}/${key}"

if [ -f "${out}/VERSIONS" ]; then
  echo "control plane already built: ${out}" >&2
  echo "${out}"
  exit 0
fi

start=$SECONDS
mkdir -p "${cache}"
tmp="$(mktemp -d "${cache}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

# Lean: no cgo, no debug info, no paths; only the three binaries. The version is stamped as
# Kubernetes' own build does (go build alone leaves v0.0.0-master).
export CGO_ENABLED=0
minor="${k8s#v1.}"
minor="${minor%%.*}"
version_pkg=k8s.io/component-base/version
ldflags="-s -w -X ${version_pkg}.gitVersion=${k8s} -X ${version_pkg}.gitMajor=1"
ldflags+=" -X ${version_pkg}.gitMinor=${minor} -X ${version_pkg}.gitTreeState=clean"
flags=(-trimpath "-ldflags=-s -w")
echo "building etcd ${etcd}, kube-apiserver and kube-controller-manager ${k8s} ..." >&2
nice go mod download
nice go build "${flags[@]}" -o "${tmp}/etcd" go.etcd.io/etcd/server/v3
nice go build -trimpath "-ldflags=${ldflags}" -o "${tmp}/kube-apiserver" \
  k8s.io/kubernetes/cmd/kube-apiserver
nice go build -trimpath "-ldflags=${ldflags}" -o "${tmp}/kube-controller-manager" \
  k8s.io/kubernetes/cmd/kube-controller-manager

# The CRDs, from the modules' source trees (go mod download prints where it put them).
module_dir() {
  go mod download -json "$1" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}
argo_dir="$(module_dir "github.com/argoproj/argo-rollouts@${ARGO_ROLLOUTS_VERSION}")"
install -m 0644 "${argo_dir}/manifests/crds/rollout-crd.yaml" "${tmp}/rollout-crd.yaml"
cm_dir="$(module_dir "github.com/cert-manager/cert-manager@${CERT_MANAGER_VERSION}")"
for crd in issuers certificates; do
  install -m 0644 "${cm_dir}/deploy/crds/cert-manager.io_${crd}.yaml" \
    "${tmp}/cert-manager-${crd}-crd.yaml"
done

printf 'kubernetes %s\netcd %s\nargo-rollouts %s\ncert-manager %s\n' "${k8s}" "${etcd}" \
  "${ARGO_ROLLOUTS_VERSION}" "${CERT_MANAGER_VERSION}" >"${tmp}/VERSIONS"
rm -rf "${out}"
mv "${tmp}" "${out}"
trap - EXIT
echo "built ${key} in $((SECONDS - start))s" >&2
echo "${out}"
