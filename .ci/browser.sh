#!/usr/bin/env bash
# The browser tier: Chromium from Debian packages, then the test that opens a review report in
# headless Chromium and checks every figure renders. Without Chromium, one SKIPPED line says why.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" != 0 ]; then echo "SKIPPED: browser test: chromium is missing and this is not root"; exit 0; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || { echo "SKIPPED: browser test: apt-get install chromium failed"; exit 0; }
fi
"$PY" -m pytest -m browser -rs
