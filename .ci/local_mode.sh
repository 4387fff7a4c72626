#!/usr/bin/env bash
# The local-mode tier: a Docker engine, a base image made with debootstrap (no registry), the
# training image built offline from a wheelhouse, then two real SageMaker local-mode jobs, training and prediction
# (tests/test_local_mode.py). When the engine cannot be had, one SKIPPED line says why and the
# tier passes without pretending to have run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BASE=brainseg-base:bookworm
VARIANT=${VARIANT:-cpu}  # cuda: the GPU image (make test-cuda-image), its jobs run on this CPU
IMAGE=${IMAGE:-brainseg-train:ci}

skip() { echo "SKIPPED: local-mode test: $*"; exit 0; }

if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" != 0 ]; then skip "docker.io, docker-compose and debootstrap are missing and this is not root"; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null \
        || skip "apt-get install docker.io docker-compose debootstrap failed"
fi
if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then skip "the Docker engine is not running and this is not root"; fi
    nohup dockerd --iptables=false --storage-driver=vfs >/tmp/brainseg-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || skip "dockerd did not start: $(tail -1 /tmp/brainseg-dockerd.log)"
fi
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    bash docker/base_image.sh "$BASE" || skip "debootstrap base image failed"
fi
started=$(date +%s)
OFFLINE=1 VARIANT="$VARIANT" BASE_IMAGE="$BASE" PYTHON="$PY" bash docker/build.sh "$IMAGE" >/tmp/brainseg-image-build.log 2>&1 \
    || { tail -30 /tmp/brainseg-image-build.log; echo "error: the training image did not build"; exit 1; }
echo "built $IMAGE ($VARIANT) offline from docker/wheelhouse/ in $(( $(date +%s) - started )) s:" \
     "$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')"
docker history --format '  {{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-150
docker run --rm --entrypoint python3 "$IMAGE" -c "import torch; print('in the image: torch', torch.__version__,
    'CUDA runtime', torch.version.cuda, 'GPU visible', torch.cuda.is_available())" || exit 1
BRAINSEG_TEST_IMAGE="$IMAGE" "$PY" -m pytest -m docker -rs
