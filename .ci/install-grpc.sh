#!/usr/bin/env bash
# Installs the real gRPC stack tests/grpc.rs drives lameduck with: Python grpcio (client and
# server), grpcio-health-checking (the standard grpc.health.v1.Health service) and the
# protobuf runtime it needs. From PyPI, as wheels (grpcio ships manylinux binaries).
#
# Idempotent, non-interactive, runs as root: a virtualenv in $LAMEDUCK_GRPC_VENV (pinned
# versions; pip does nothing when they are already there), the same approach as
# install-k8s-tools.sh. tests/grpc.rs runs $LAMEDUCK_GRPC_PYTHON, else this venv's python
# when it exists, else python3 from PATH. Run the tests with LAMEDUCK_REQUIRE_TOOLS=1
# afterwards so a missing module fails instead of skipping.
set -euo pipefail

VENV="${LAMEDUCK_GRPC_VENV:-/opt/lameduck-grpc}"
GRPCIO_VERSION=1.85.1                  # grpcio-health-checking 1.85.1 needs grpcio >= 1.85.1
GRPCIO_HEALTH_CHECKING_VERSION=1.85.1
PROTOBUF_VERSION=7.36.2                # health checking 1.85.1: protobuf >= 7.35.1, < 8

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive

# shellcheck source=.ci/venv.sh
source "$(dirname "$0")/venv.sh"
make_venv "$VENV"

"$VENV/bin/pip" install --quiet --only-binary grpcio \
    "grpcio==${GRPCIO_VERSION}" \
    "grpcio-health-checking==${GRPCIO_HEALTH_CHECKING_VERSION}" \
    "protobuf==${PROTOBUF_VERSION}"

"$VENV/bin/python" -c 'import grpc, grpc_health.v1.health; print("install-grpc: grpcio", grpc.__version__)'
echo "install-grpc: $VENV/bin/python"
