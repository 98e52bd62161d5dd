#!/usr/bin/env bash
# One prepared run for a lent GPU machine (bench/README.md): environment, nograd import, the kernel tests,
# bench/attention.py with its CUDA defaults, bench/pyramiddrop.py on a LLaVA-1.5-7B-shaped model, then every method
# on the GPU against the CPU (tests/test_cuda.py). Every step is time-boxed; a failing step is reported, not fatal.
#
#   bash bench/gpu.sh                # from anywhere; logs, attention.md and pyramiddrop.md go to $OUT (else bench/out)
#
# Worst case under 10 minutes, to fit one device call's timeout_s of 600: TEST_TIMEOUT (90 s) + BENCH_TIMEOUT (200 s,
# the bench stops starting new cases after BENCH_BUDGET = 140 s) + PD_TIMEOUT (120 s, no new case or timed round
# after PD_BUDGET = 75 s) + CUDA_TEST_TIMEOUT (90 s) + up to 10 + 15 + 15 + 10 s of kill grace = 550 s, plus the
# setup (the import check, the install and the wheels: tens of seconds, each step time-boxed). Override any of
# these, PYTHON, or add BENCH_ARGS / PD_ARGS (default --shape llava-7b), through the environment. The image needs
# torch + triton (+ transformers, which `import nograd` pulls in); wheels carried in .whl (bench/wheels.sh: diffusers,
# for the DiT cases of tests/test_cuda.py) are installed first when present.
#
# STEPS picks the steps after the environment and the import (default "tests attention pyramiddrop cuda"); "methods"
# adds bench/methods.py (PAI, PAINT, ClearSight, ZeroTuning, ACT against the plain model, 7B shapes) under
# METHODS_TIMEOUT (150 s; METHODS_BUDGET 90 s), e.g. with device time left after a default run:
#   STEPS=methods bash bench/gpu.sh
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-90}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_BUDGET=${BENCH_BUDGET:-140}
BENCH_ARGS=${BENCH_ARGS:-}
PD_TIMEOUT=${PD_TIMEOUT:-120}
PD_BUDGET=${PD_BUDGET:-75}
PD_ARGS=${PD_ARGS:---shape llava-7b}
METHODS_TIMEOUT=${METHODS_TIMEOUT:-150}
METHODS_BUDGET=${METHODS_BUDGET:-90}
METHODS_ARGS=${METHODS_ARGS:---shape llava-7b}
CUDA_TEST_TIMEOUT=${CUDA_TEST_TIMEOUT:-90}
STEPS=" ${STEPS:-tests attention pyramiddrop cuda} "
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
START=$(date +%s)
DONE=()

note() { echo "== [$(( $(date +%s) - START )) s] $*"; }
wanted() { [[ "$STEPS" == *" $1 "* ]]; }
record() { DONE+=("$1=$2"); note "$1: exit $2"; }

# 1. environment ---------------------------------------------------------------------------------------------------
{
  date -u
  nvidia-smi || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
    --format=csv || true
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
for dist in ("triton", "transformers", "accelerate", "diffusers", "flash-attn"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "| SMs", p.multi_processor_count, "| cc", f"{p.major}.{p.minor}",
          "| memory GiB", round(p.total_memory / 2**30, 1), "| cuDNN", torch.backends.cudnn.version())
EOF
} 2>&1 | tee "$OUT/env.txt"
record environment "${PIPESTATUS[0]}"

# 2. make nograd importable (editable install, else a PYTHONPATH shim of the source layout) ------------------------
if "$PY" -c "import nograd.kernels" >/dev/null 2>&1; then
  record nograd-import 0
else
  timeout 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] || ! "$PY" -c "import nograd.kernels" >>"$OUT/install.log" 2>&1; then
    # pyproject maps nograd -> plugin/, nograd.kernels -> kernels/, nograd.patches -> patches/
    SHIM=$(mktemp -d)/src
    mkdir -p "$SHIM/nograd"
    for f in "$PWD"/plugin/*; do ln -s "$f" "$SHIM/nograd/"; done
    ln -sfn "$PWD/kernels" "$SHIM/nograd/kernels"
    ln -sfn "$PWD/patches" "$SHIM/nograd/patches"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install -e . failed (exit $rc) or did not import; using PYTHONPATH shim $SHIM" >>"$OUT/install.log"
    "$PY" -c "import nograd.kernels as k; print('nograd.kernels from', k.__file__, 'BACKENDS', k.BACKENDS)" \
      >>"$OUT/install.log" 2>&1
    rc=$?
  fi
  tail -n 5 "$OUT/install.log"
  record nograd-import "$rc"
fi

# 2b. carried wheels (bench/wheels.sh): installed beside the image's packages, first on the path -------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$OUT/install.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  record wheels "$rc"
fi
CONFTEST=()
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
  # tests/conftest.py imports the tiny diffusers models; tests/kernels and tests/test_cuda.py need none of its fixtures
  CONFTEST=(--noconftest)
  echo "diffusers is not installed: running the tests with --noconftest (test_cuda.py's DiT cases skip)" \
    | tee "$OUT/pytest.log"
fi

# 3. kernel tests (the Triton backend's correctness tests run on CUDA here) -----------------------------------------
if ! wanted tests; then
  note "tests not in STEPS: skipped"
elif ls tests/kernels/test_*.py >/dev/null 2>&1; then
  set -o pipefail
  PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$TEST_TIMEOUT" \
    "$PY" -m pytest tests/kernels -q -rfE -p no:cacheprovider -m "not slow" "${CONFTEST[@]}" 2>&1 | tee -a "$OUT/pytest.log" \
    | tail -n 25
  record pytest "$?"
  set +o pipefail
else
  note "no tests/kernels/test_*.py: tests skipped"
fi

# 4. the benchmark ---------------------------------------------------------------------------------------------------
set -o pipefail
if wanted attention; then
  # shellcheck disable=SC2086
  timeout -k 15 "$BENCH_TIMEOUT" "$PY" bench/attention.py --markdown "$OUT/attention.md" --budget-s "$BENCH_BUDGET" \
    $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
  record bench "$?"
fi

# 5. PyramidDrop / FastV against the plain model (prefill, decode, KV cache) ---------------------------------------
if wanted pyramiddrop; then
  # shellcheck disable=SC2086
  timeout -k 15 "$PD_TIMEOUT" "$PY" bench/pyramiddrop.py --device cuda --dtype bfloat16 --budget-s "$PD_BUDGET" \
    --markdown "$OUT/pyramiddrop.md" $PD_ARGS 2>&1 | tee "$OUT/pyramiddrop.log"
  record pyramiddrop "$?"
fi

# 6. (STEPS=methods) the attention-editing methods against the plain model -----------------------------------------
if wanted methods; then
  # shellcheck disable=SC2086
  timeout -k 15 "$METHODS_TIMEOUT" "$PY" bench/methods.py --device cuda --dtype bfloat16 --budget-s "$METHODS_BUDGET" \
    --markdown "$OUT/methods.md" $METHODS_ARGS 2>&1 | tee "$OUT/methods.log"
  record methods "$?"
fi

# 7. every method on the GPU against the CPU (device placement, the Triton paths auto picks) ----------------------
if wanted cuda; then
  PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "$CUDA_TEST_TIMEOUT" \
    "$PY" -m pytest tests/test_cuda.py -q -rfE -p no:cacheprovider "${CONFTEST[@]}" 2>&1 | tee -a "$OUT/pytest.log" \
    | tail -n 25
  record cuda-tests "$?"
fi
set +o pipefail

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>/dev/null || true
note "steps: ${DONE[*]} (124 = timed out); files in $OUT:"
ls -l "$OUT"
