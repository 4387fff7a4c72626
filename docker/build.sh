#!/usr/bin/env bash
# Build the training image from docker/Dockerfile.
#
#   bash docker/build.sh [TAG]             # default tag brainseg-train:latest
#   OFFLINE=1 bash docker/build.sh [TAG]   # fill docker/wheelhouse/ from this machine's pip, build with no network
#   BASE_IMAGE=brainseg-base:bookworm bash docker/build.sh   # any base with bash and python3.11 (+ venv)
#   VARIANT=cuda bash docker/build.sh brainseg-train:cuda    # GPU instances: torch's CUDA 12 build
#
# VARIANT=cpu (default) installs torch from PyTorch's CPU index; VARIANT=cuda installs the PyPI build of
# the same version, which carries the CUDA 12 runtime as pip packages (several GB), so the base needs
# no CUDA: only the host's NVIDIA driver, which SageMaker's GPU instances have. An offline build takes
# torch from the wheelhouse, i.e. whichever build this machine's pip gives for TORCH_SPEC.
#
# Offline builds are for hospitals and VPCs without internet: the wheelhouse is made with `pip wheel` on a
# machine that can reach a package index (or a mirror) and has the image's platform (linux x86_64,
# CPython 3.11, glibc >= bookworm's); packages that ship only as source are built into wheels there,
# since the base image has no compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-brainseg-train:latest}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
OFFLINE=${OFFLINE:-0}
VARIANT=${VARIANT:-cpu}
case "$VARIANT" in
    cpu) TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu} ;;
    cuda) TORCH_INDEX=${TORCH_INDEX:-https://pypi.org/simple} ;;
    *) echo "VARIANT=$VARIANT: expected cpu or cuda" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}

if [ "$OFFLINE" = "1" ]; then
    echo "building the wheelhouse in docker/wheelhouse/ with $PYTHON ($("$PYTHON" -c "import sys, platform; print(platform.machine(), sys.version.split()[0])"))"
    "$PYTHON" -m pip wheel --quiet --wheel-dir docker/wheelhouse "$TORCH_SPEC" -r entry_point/requirements.txt
fi
docker build --file docker/Dockerfile --tag "$TAG" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" --build-arg OFFLINE="$OFFLINE" \
    --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg VARIANT="$VARIANT" .
echo "built $TAG (base $BASE_IMAGE, $VARIANT, offline=$OFFLINE)"
