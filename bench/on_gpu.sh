#!/usr/bin/env bash
# The checks that need a CUDA device, in one run (a lent GPU's time is short): the CUDA tests, the train-step
# benchmark at batch 64 and 256, fp32 and bf16, and the training tests that then run on CUDA (mixed precision,
# resume, torch.compile).
#
#     bash bench/on_gpu.sh [LOGDIR]      # logs and bench/results/train_step_cuda.json copied to LOGDIR
#
# gpdc must be importable: `pip install -e .`, or where nothing can be installed (a lent machine with pydantic carried
# as wheels) `ln -s ../passes gpdc/passes; export PYTHONPATH=$PWD`.
set -u
logs=${1:-/tmp/gpdc_gpu}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rA --tb=short --durations=0 tests/test_cuda.py > "$logs/cuda_tests.log" 2>&1
timeout 240 python3 bench/train_step.py --device cuda --steps 10 2>&1 | tee "$logs/train_step.log"
timeout 180 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_train.py \
    -k "mixed_precision or resume_gives or compiled_objective" > "$logs/train_tests.log" 2>&1
tail -n 30 "$logs/cuda_tests.log" "$logs/train_tests.log"
cp bench/results/train_step_cuda.json "$logs/" 2>/dev/null
