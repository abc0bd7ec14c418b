#!/usr/bin/env bash
# Pretraining throughput on a GPU in the paper's setting (benchmarks/throughput.py --preset paper: resnet50 at
# 224 px, the 64 x 64 mask grid, bf16 autocast where the GPU computes it, channels-last): every agent's images per
# second and ratio to plain training (none, uniform-mask, reinforce, reinforce-official, reinforce-budget, ppo, a2c),
# printed as a Markdown table (see throughput.py's docstring for how the measurement is made fair).
#
# The lent GPU machines hold PyTorch, torchvision, TensorBoard, tqdm, scikit-learn, pandas and matplotlib
# but neither gymnasium nor stable-baselines3, and reach no package registry. So, once, where pip reaches PyPI:
#     bash benchmarks/gpu.sh --prepare      # three pure-Python wheels into .whl/ (kept out of git)
# then on the GPU machine, in one call that carries .whl:
#     bash benchmarks/gpu.sh                # about 3-5 minutes of work; extra arguments go to throughput.py
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
# 7 agents x 3 rounds x (8 + 24) steps at batch 32; 2048 training images make an epoch 64 steps (epoch starts are
# untimed); a fresh core per agent and round. The whole call stays under 8 minutes.
timeout 450 "$PY" benchmarks/throughput.py --preset paper --device cuda --steps 24 --rounds 3 --warmup 8 \
    --workers 6 "$@"
