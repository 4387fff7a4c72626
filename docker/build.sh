#!/usr/bin/env bash
# Build the training image from docker/Dockerfile.
#
#   bash docker/build.sh [TAG]             # default tag brainseg-train:latest
#   OFFLINE=1 bash docker/build.sh [TAG]   # fill docker/wheelhouse/ from this machine's pip, build with no network
#   BASE_IMAGE=brainseg-base:bookworm bash docker/build.sh   # any base with bash and python3.11 (+ venv)
#   VARIANT=cuda bash docker/build.sh brainseg-train:cuda    # GPU instances: torch's PyPI (CUDA 13.0) build
#   VARIANT=cuda TORCH_INDEX=https://download.pytorch.org/whl/cu126 bash docker/build.sh brainseg-train:cuda
#                                                            # hosts whose NVIDIA driver predates R580
#
# VARIANT=cpu (default) installs torch from PyTorch's CPU index; VARIANT=cuda installs the build of the
# same version from TORCH_INDEX (PyPI's: CUDA 13.0, which needs an R580 or later driver), which carries
# the CUDA runtime as pip packages (several GB), so the base needs no CUDA: only the host's NVIDIA
# driver, new enough for that runtime. An offline build refills
# docker/wheelhouse/ for its variant: the CPU one with whichever build this machine's pip gives for
# TORCH_SPEC, the CUDA one from TORCH_INDEX alone (pip --isolated; PyPI unless you name a mirror).
# The image build fails when VARIANT=cuda installed a torch without CUDA.
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
    # One wheelhouse, refilled for the variant built: a CPU and a CUDA torch of one version side by
    # side would leave the choice to pip (it takes the +cpu build, a local version, as the higher).
    rm -f docker/wheelhouse/*.whl docker/wheelhouse/*.tar.gz
    echo "building the $VARIANT wheelhouse in docker/wheelhouse/ with $PYTHON ($("$PYTHON" -c "import sys, platform; print(platform.machine(), sys.version.split()[0])"))"
    if [ "$VARIANT" = cuda ]; then
        # From $TORCH_INDEX alone (--isolated): this machine's pip configuration may pin torch's
        # CPU build, which would make a "cuda" image without CUDA.
        "$PYTHON" -m pip wheel --quiet --isolated --index-url "$TORCH_INDEX" --wheel-dir docker/wheelhouse \
            "$TORCH_SPEC" -r entry_point/requirements.txt
    else
        "$PYTHON" -m pip wheel --quiet --wheel-dir docker/wheelhouse "$TORCH_SPEC" -r entry_point/requirements.txt
    fi
fi
docker build --file docker/Dockerfile --tag "$TAG" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" --build-arg OFFLINE="$OFFLINE" \
    --build-arg TORCH_INDEX="$TORCH_INDEX" --build-arg VARIANT="$VARIANT" .
echo "built $TAG (base $BASE_IMAGE, $VARIANT, offline=$OFFLINE)"
