#!/usr/bin/env bash
# Builds the node tier's Kubernetes binaries (tests/node.rs): the kubelet, kube-scheduler and
# kube-proxy, from the same k8s.io/kubernetes module the control plane pins
# (tests/cluster/go.mod), so they reuse its module and build caches. The rest of the node
# (containerd, runc, the CNI plugins, HAProxy) comes from Debian (.ci/install-node.sh).
#
# Output: $LAMEDUCK_NODE_CACHE (default ~/.cache/lameduck/node)/k8s-<version>/ with
#   kubelet kube-scheduler kube-proxy VERSIONS
# Does nothing if that directory is already complete. A directory from before a binary was
# added to the list (kube-proxy came later) gets only the missing ones: each is built aside
# and moved in, so a test reading the directory meanwhile never sees a partial file. Prints
# the directory on the last line.
set -euo pipefail
cd "$(dirname "$0")/../cluster"

binaries=(kubelet kube-scheduler kube-proxy)
k8s="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
key="k8s-${k8s}"
cache="${LAMEDUCK_NODE_CACHE:-${HOME}/.cache/lameduck/node}"
out="${cache}/${key}"

missing=()
for cmd in "${binaries[@]}"; do
  [ -f "${out}/${cmd}" ] || missing+=("${cmd}")
done
if [ -f "${out}/VERSIONS" ] && [ "${#missing[@]}" -eq 0 ]; then
  echo "node binaries already built: ${out}" >&2
  echo "${out}"
  exit 0
fi

start=$SECONDS
mkdir -p "${cache}"
tmp="$(mktemp -d "${cache}/.build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

# As tests/cluster/build.sh: no cgo, no debug info, the version stamped as Kubernetes' own
# build does (the kubelet reports it as the node's kubeletVersion).
export CGO_ENABLED=0
minor="${k8s#v1.}"
minor="${minor%%.*}"
version_pkg=k8s.io/component-base/version
ldflags="-s -w -X ${version_pkg}.gitVersion=${k8s} -X ${version_pkg}.gitMajor=1"
ldflags+=" -X ${version_pkg}.gitMinor=${minor} -X ${version_pkg}.gitTreeState=clean"
echo "building ${missing[*]} ${k8s} ..." >&2
for cmd in "${missing[@]}"; do
  nice go build -trimpath "-ldflags=${ldflags}" -o "${tmp}/${cmd}" "k8s.io/kubernetes/cmd/${cmd}"
done

if [ -f "${out}/VERSIONS" ]; then
  # Complete but for the new binaries: add them (rename within one file system is atomic).
  for cmd in "${missing[@]}"; do
    mv "${tmp}/${cmd}" "${out}/${cmd}"
  done
else
  printf 'kubernetes %s\n' "${k8s}" >"${tmp}/VERSIONS"
  rm -rf "${out}"
  mv "${tmp}" "${out}"
  trap - EXIT
fi
echo "built ${missing[*]} (${key}) in $((SECONDS - start))s" >&2
echo "${out}"
