#!/usr/bin/env bash
# Pretraining throughput on a GPU: none, uniform-mask, reinforce and reinforce (official) with resnet50 at
# 224 px and the paper's 64 x 64 mask grid (bf16 autocast, channels-last), printed as a Markdown table
# (benchmarks/throughput.py; see its docstring for how the measurement is made fair).
#
# The lent GPU machines hold PyTorch, torchvision, TensorBoard, tqdm, scikit-learn, pandas and matplotlib
# but neither gymnasium nor stable-baselines3, and reach no package registry. So, once, where pip reaches PyPI:
#     bash benchmarks/gpu.sh --prepare      # three pure-Python wheels into .whl/ (kept out of git)
# then on the GPU machine, in one call that carries .whl:
#     bash benchmarks/gpu.sh                # about 2-4 minutes of work; extra arguments go to throughput.py
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2)

if [[ "${1:-}" == "--prepare" ]]; then
    py=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    "$py" -m pip download --quiet --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
    mkdir -p .git/info
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    ls -l .whl
    exit 0
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import gymnasium, stable_baselines3' 2>/dev/null; then
    if ! compgen -G '.whl/*.whl' >/dev/null; then
        echo "error: gymnasium or stable-baselines3 is missing and there is no .whl/ folder; run" \
             "'bash benchmarks/gpu.sh --prepare' where pip reaches PyPI and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/noisemask-site .whl/*.whl
    export PYTHONPATH=/tmp/noisemask-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export NOISEMASK_CACHE=${NOISEMASK_CACHE:-/tmp/noisemask-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpu cores: $(nproc)"
# 4 agents x (10 + 3 x 40) steps at batch 32; 2048 training images make an epoch 64 steps (epoch ends are untimed).
timeout 420 "$PY" benchmarks/throughput.py --classifier resnet50 --image-size 224 --batch-size 32 --grid 64 \
    --blur-kernel 13 --blur-sigma 6 --device cuda --steps 40 --rounds 3 --warmup 10 --workers 6 --n-train 2048 "$@"
