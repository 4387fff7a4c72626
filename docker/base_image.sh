#!/usr/bin/env bash
# Make a minimal Debian bookworm base image (bash, python3.11, venv, pip) without any registry:
#
#   bash docker/base_image.sh [TAG]        # default brainseg-base:bookworm; needs root, debootstrap, docker
#
# For machines that cannot pull python:3.11-slim. Takes about a minute.
set -euo pipefail
TAG=${1:-brainseg-base:bookworm}
ROOTFS=$(mktemp -d)
chmod 755 "$ROOTFS"  # mktemp makes it 0700, which would lock the non-root user out of /
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" >/dev/null
tar -C "$ROOTFS" -c . | docker import - "$TAG" >/dev/null
echo "imported $TAG"
