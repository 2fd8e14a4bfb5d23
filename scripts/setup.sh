#!/usr/bin/env bash
# Sets up everything OneR needs on a fresh machine, idempotently, in ./.venv.
#   bash scripts/setup.sh          # training, evaluation and the demo
#   bash scripts/setup.sh --test   # the same plus the test tools (and Debian's chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="train,demo"
if [[ "${1:-}" == "--test" ]]; then
    extras="test"
    if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
        echo "setup: installing Debian's chromium for the demo's browser test"
        # Not fatal: without chromium only the browser test skips (and says why).
        { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
            || echo "setup: could not install chromium; the demo's browser test will be skipped"
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch FIRST and pinned, from the index pip is configured with: where that serves a CPU wheel (as on
# the machines this project is tested on), the CPU build; from PyPI on Linux, the CUDA build. An
# already installed 2.13.0 (e.g. 2.13.0+cpu from PyTorch's CPU index, see README) is kept.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[${extras}]"
if [[ "$extras" == "test" ]]; then
    # DeepSpeed for its CPU test (tests/test_sharded.py): a source build (about 45 s); without build
    # isolation it builds against the CPU torch above instead of downloading a CUDA one.
    .venv/bin/pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
    # clip_benchmark for tests/test_standard_eval.py, which runs its metric functions through OneR's
    # open_clip adapter; --no-deps: its requirements pull torchvision and open_clip, which OneR never needs.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps "clip-benchmark==1.6.2"
fi
echo "setup: ready (.venv, extras: ${extras})"
