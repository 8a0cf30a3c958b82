#!/usr/bin/env bash
# cargo-fuzz, pinned, for .ci/fuzz.sh. Skipped when that exact version is already installed.
# A fresh machine has only the stable toolchain (no nightly can be downloaded), so .ci/fuzz.sh
# builds the targets with stable and RUSTC_BOOTSTRAP=1; cargo-fuzz itself builds on stable.
set -euo pipefail

version=0.13.2
if cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $version"; then
  echo "cargo-fuzz $version already installed"
  exit 0
fi
cargo install cargo-fuzz --locked --version "$version"
