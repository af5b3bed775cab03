#!/usr/bin/env bash
# Compile every launch configuration for sm_90a (shared memory, registers, spills, TMA/wgmma) with
# another Triton release than the one in .venv, e.g. the GPU machine's:
#   bash scripts/compile_check.sh 3.6.0
# Builds .venv-triton-VERSION once (torch from .venv's version, then that Triton without deps).
set -euo pipefail
ver=${1:?usage: bash scripts/compile_check.sh TRITON_VERSION}
venv=".venv-triton-$ver"
if [ ! -x "$venv/bin/python" ]; then
  torch_ver=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_ver" numpy pytest safetensors
  "$venv/bin/pip" install -q --no-deps "triton==$ver"
fi
# TRITON_INTERPRET unset: the compile tests run in this process (tests/kernel_env.py)
env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_kernel_compile.py -m ""
