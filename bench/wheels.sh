#!/usr/bin/env bash
# The wheels bench/gpu.sh installs on a lent GPU machine, whose image lacks diffusers (/work/.library/device/KINDS.md):
# run here, where pip reaches PyPI, then name .whl in the device call's carry (bench/README.md, "gpu.sh").
# diffusers is pure Python; of its requirements the image lacks only importlib_metadata.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-8.7.0}"
ls -l .whl
