#!/usr/bin/env bash
# Every GPU check of one session in one command, for a lent GPU machine with no network: the GPU
# tests, then the GPU parts of the benchmarks, each under its own time limit so that one hang
# cannot eat the rest. Logs go to $OUT (or ./gpu-logs). Wheels the machine lacks (qwix) travel in
# .whl/. SMALL=1 shrinks every run to a dry run that a CPU finishes in minutes.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT" /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
# The package without installing it: ettin_jax with convert/ and train/ where pyproject puts them.
rm -rf /tmp/site/ettin_jax && cp -r ettin_jax /tmp/site/ && cp -r convert /tmp/site/ettin_jax/convert \
    && cp -r train /tmp/site/ettin_jax/train
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5  # transformers shares the GPU in throughput.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/machine.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/machine.txt"

if [ "${SMALL:-0}" = 1 ]; then
    Q="--sizes 17m --batches 1 2 --prompt 16 --new 24 --short 8 --repeats 1 --engine-size 17m --requests 8 --engine-new 16 --engine-max-prompt 32"
    T="--size 17m --requests 16 --max-prompt 64 --max-new 32"
    F="--size 17m --length 64 --batch 4 --steps 2"
else
    Q="--sizes 1b --batches 1 64 --repeats 3 --requests 128 --engine-new 128"
    T="--size 150m --requests 192 --dtype bfloat16 --torch-device cuda"
    F="--size 1b --dtype bfloat16 --length 1024 --batch 8 --steps 5"
fi

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    tail -n 40 "$OUT/$name.log"
}

# shellcheck disable=SC2086
step quantization 270 python3 benchmarks/quantization.py --parts matmul decode engine $Q
# shellcheck disable=SC2086
step throughput 170 python3 benchmarks/throughput.py --sides engine hf-batch $T
# -P: without it `python -m` puts the checkout first on the path, whose ettin_jax lacks convert/.
step gpu-tests 90 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_gpu.py
# Fine-tuning: LoRA against full (step time, planned memory), packed against padded (tokens/s).
# shellcheck disable=SC2086
step lora 120 python3 benchmarks/lora.py $F
# shellcheck disable=SC2086
step packing 150 python3 benchmarks/packing.py $F
