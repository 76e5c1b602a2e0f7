#!/usr/bin/env bash
# The GPU check in one call: correctness on the device against float64 NumPy
# references, then the fused loss against the materialised one at Gemma 2 2B's and
# Llama 3's heads, lookup, decode, RoPE, a TransformerLM training step and generate;
# writes docs/performance-gpu.md (see gpu_check.py's docstring). About 8 minutes at
# most on one H100. Exits non-zero if a correctness item FAILs (after writing the
# page); a goal MISSED is reported, not an error.
#
# The GPU machine's image has JAX, equinox, optax and jaxtyping but not beartype.
# Fill .whl/ (git-ignored) once, here, from the repository's root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl beartype==0.23.1
#
# Then the device tool's call (the machine gets the files without .git, so put the
# commit, `git rev-parse --short HEAD` here, in the command):
#
#   run(command="EQX_EMBED_COMMIT=<commit> bash benchmarks/accelerator/run.sh",
#       carry=[".whl"], timeout_s=540)
#
# The page, the raw figures (gpu_check.json) and the log come back under $OUT.
# Anywhere else: `bash benchmarks/accelerator/run.sh --smoke` runs tiny shapes on
# the CPU (the test suite does); GPU_CHECK_PAGE names another page to write, and
# PYTHON another interpreter than python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
page=${GPU_CHECK_PAGE:-docs/performance-gpu.md}
out=${OUT:-}

if ! "$python" -c "import beartype" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "beartype is missing and .whl/ holds no wheel: see this script's header." >&2
        exit 2
    fi
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package is not installed there: it runs from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

arguments=(--page "$page")
if [ -n "$out" ]; then
    arguments+=(--json "$out/gpu_check.json")
fi
status=0
if [ -n "$out" ]; then
    "$python" benchmarks/accelerator/gpu_check.py "${arguments[@]}" "$@" 2>&1 \
        | tee "$out/gpu_check.log" || status=$?
    cp "$page" "$out/" || true
else
    "$python" benchmarks/accelerator/gpu_check.py "${arguments[@]}" "$@" || status=$?
fi
exit "$status"
