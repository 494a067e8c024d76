#!/usr/bin/env bash
# The quality study on the GPU machine, in three commands of the same lease (the work directory
# /tmp/msa-quality lives on that machine's disk between them):
#     OUT=<dir> bash experiments/quality/run_on_gpu.sh 1   # dense pretraining          (~9 min)
#     OUT=<dir> bash experiments/quality/run_on_gpu.sh 2   # dense / MSA continuations  (~9 min)
#     OUT=<dir> bash experiments/quality/run_on_gpu.sh 3   # finish cut-off runs, evaluate (~6 min)
# Needs the tree's .whl (test and transformers wheels) and experiments/quality/data (prepare_data.py).
set -euo pipefail
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
if ! python3 -c "import transformers, rich" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/hf/*.whl .whl/*.whl
fi
study="python3 experiments/quality/study.py"
case "$1" in
    1) $study pretrain --budget-s "${BUDGET:-470}" --out "$OUT" ;;
    2) $study continue --budget-s "${BUDGET:-500}" --out "$OUT" ;;
    3) $study continue --budget-s "${BUDGET:-250}" --out "$OUT" && $study evaluate --out "$OUT" ;;
esac
