#!/usr/bin/env bash
# The GPU check, run on the device machine from the repository root:
#     OUT=/some/dir SEQLENS=8192,32768,131072 INFERENCE=1 bash scripts/gpu_check.sh
# Runs the test suite on the GPU (TESTS, default all: the kernel tests then run compiled, in
# bf16/fp16/fp32), then the kernel benchmark (SEQLENS=none skips it; TUNE=<length> sweeps the configurations
# of TUNE_KERNELS first; DETERMINISTIC=1 also times the deterministic training step), with MODEL_STEP=1
# the SmolLM2-shaped training step (benchmarks/model_step.py, eager with --profile, then replayed from CUDA
# graphs under graphed/; MODEL_STEP_ARGS, e.g. "--seqlens 8192,16384 --kl-topk 8") and, with INFERENCE=1,
# `msa generate` (bf16 and FP8 index keys) and the inference benchmark (PARTS of
# benchmarks/inference.py, more options in INFERENCE_ARGS, e.g. "--index-dtype fp8 --selections
# overlapping"). Logs and JSON are written under $WORK and packed into $OUT/gpu_check.tar.gz after every
# stage (the device tool returns at most 8 files; a run cut off by its time limit keeps the finished stages).
# Test wheels carried in .whl are installed when the machine's Python lacks pytest, hypothesis, rich or
# transformers (.whl/hf: transformers and its dependencies, httpx2 included, as `pip download` gets them for
# Python 3.12). The machine's copy of the
# tree has no .git: pass MSA_COMMIT=<commit> so that the results name the commit they measured.
set -uo pipefail
OUT=${OUT:-/tmp/msa-gpu}
WORK=${WORK:-/tmp/msa-gpu-check}
mkdir -p "$OUT" "$WORK"
pack() { tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" .; }
export PYTHONPATH=src PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import pytest, hypothesis, rich, transformers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl .whl/hf/*.whl
fi
export PYTHONPATH=src:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$WORK/device.txt"
python3 -m pytest -q ${TESTS:-tests} 2>&1 | tee "$WORK/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
pack
if [ "${SEQLENS:-}" != "none" ]; then
    python3 benchmarks/kernels.py --out "$WORK" --seqlens "${SEQLENS:-8192,32768,131072}" --tune "${TUNE:-0}" \
        --tune-kernels "${TUNE_KERNELS:-indexer,kv_outer}" ${DETERMINISTIC:+--deterministic} 2>&1 \
        | tee "$WORK/bench.log"
    pack
fi
if [ "${MODEL_STEP:-0}" = "1" ]; then
    python3 benchmarks/model_step.py --out "$WORK" --profile ${MODEL_STEP_ARGS:-} 2>&1 | tee "$WORK/model_step.log"
    pack
    python3 benchmarks/model_step.py --out "$WORK/graphed" --cuda-graph ${MODEL_STEP_ARGS:-} 2>&1 \
        | tee "$WORK/model_step_graphed.log"
    pack
fi
if [ "${INFERENCE:-0}" = "1" ]; then
    python3 -m msa generate --json "$WORK/generate.json" 2>&1 | tee "$WORK/generate.log"
    python3 -m msa generate --fp8-index --json "$WORK/generate_fp8.json" 2>&1 | tee "$WORK/generate_fp8.log"
    pack
    python3 benchmarks/inference.py --out "$WORK" --parts "${PARTS:-decode,low_latency,long,prefill}" \
        ${PREFILL_CASES:+--prefill-cases "$PREFILL_CASES"} ${INFERENCE_ARGS:-} 2>&1 | tee "$WORK/inference.log"
fi
pack
exit "$tests_rc"
