#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and a CUDA build of torch already installed (no
# network): the CUDA tests against the CPU, then decompose against one cuDNN forward+backward at the
# sizes of the CPU table and at a large model. About 5 minutes on one H200.
#
#     bash benchmarks/gpu.sh [RESULTS_DIR]      # default: gpu-results (or $OUT where that is set)
#
# DEVICE=cpu and SMALL=1 run the same steps on the CPU at toy sizes, to check the script itself.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
device=${DEVICE:-cuda}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run it, its output into $out/NAME.txt, and remember a failure
    echo "== $1"
    "${@:2}" 2>&1 | tee "$out/$1.txt" || status=1
}

# biaskit's tasks are found through their entry points: install the checkout without its
# dependencies (the image has them but netCDF4, which only writing a Dataset needs).
"$python" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$out/install.txt" 2>&1 ||
    echo "could not install the checkout (see $out/install.txt); the tests run from PYTHONPATH"
"$python" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" |
    tee "$out/device.txt"

if [ "$device" = cuda ]; then
    step cuda-tests "$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_decompose.py tests/test_train.py
fi
bench=("$python" benchmarks/bench_decompose.py --device "$device")
fast=(--methods plain decompose "decompose psi=False")
if [ "${SMALL:-0}" = 1 ]; then
    step small "${bench[@]}" --hidden 8 --batch 4 --lengths 20 "${fast[@]}" --json "$out/small.json"
    step per-lag "${bench[@]}" --hidden 8 --batch 4 --lengths 20 --methods "decompose psi=False" per-lag
    step large "${bench[@]}" --hidden 16 --batch 4 --lengths 30 "${fast[@]}" --repeats 1 --json "$out/large.json"
else
    step small "${bench[@]}" --lengths 50 200 800 "${fast[@]}" --json "$out/small.json"
    step per-lag "${bench[@]}" --lengths 400 --methods "decompose psi=False" per-lag
    step large "${bench[@]}" --hidden 1024 --batch 64 --lengths 1000 "${fast[@]}" --repeats 1 --json "$out/large.json"
fi
exit $status
