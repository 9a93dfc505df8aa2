#!/usr/bin/env bash
# Build fedllm's image base from Debian packages, for a host that reaches no container
# registry (no Docker Hub, so neither Flower's images nor python:*): debootstrap a minimal
# Debian, import it, and give it the layout of Flower's images (docker/local-base.Dockerfile).
#
#   sudo docker/build-local-base.sh            # -> fedllm-base:bookworm
#   docker build --build-arg BASE_IMAGE=fedllm-base:bookworm -f docker/supernode.Dockerfile ...
#
# Debian bookworm's Python is 3.11, so a local CPU torch wheel for cp311 in docker/wheels/
# is installed instead of a download. The base trusts what this host trusts: CA_BUNDLE
# (this host's /etc/ssl/certs/ca-certificates.crt) replaces Debian's bundle, so a network
# whose TLS proxy this host trusts works from the images too (pip reads it: PIP_CERT). Needs root (debootstrap), debootstrap (installed with
# apt-get if missing) and a running Docker engine. Settings (environment): SUITE
# (bookworm), MIRROR (http://deb.debian.org/debian), TAG (fedllm-base:bookworm),
# CA_BUNDLE (above).
set -euo pipefail

cd "$(dirname "$0")/.."
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
TAG="${TAG:-fedllm-base:$SUITE}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
ROOTFS_TAG="fedllm-rootfs:$SUITE"

die() {
  echo "build-local-base.sh: $*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root; run it with sudo."
command -v docker >/dev/null || die "no docker CLI on PATH; install a container engine (apt-get install docker.io)."
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running? start it: dockerd &)."
if ! command -v debootstrap >/dev/null; then
  echo "installing debootstrap (apt-get)..."
  apt-get install -y -qq debootstrap >/dev/null || die "debootstrap is missing and apt-get could not install it."
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
echo "debootstrap --variant=minbase $SUITE from $MIRROR ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libsqlite3-0 \
  "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 5 "$work/debootstrap.log" >&2; die "debootstrap failed (is $MIRROR reachable?)."; }
rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
if [ -f "$CA_BUNDLE" ]; then
  cp "$CA_BUNDLE" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
  echo "trusting this host's CA bundle ($CA_BUNDLE)"
fi
tar -C "$work/rootfs" -c . | docker import - "$ROOTFS_TAG" >/dev/null
mkdir "$work/context"  # the layout step copies nothing: an empty context
DOCKER_BUILDKIT=0 docker build -q --force-rm --build-arg "ROOTFS=$ROOTFS_TAG" -t "$TAG" \
  -f docker/local-base.Dockerfile "$work/context" >/dev/null
echo "built $TAG in $(($(date +%s) - start)) s ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
