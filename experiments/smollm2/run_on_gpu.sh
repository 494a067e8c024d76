#!/usr/bin/env bash
# The study on the GPU machine, from the repository root (PROTOCOL.md, "Budget"). The machine reaches no
# registry and takes at most 64 MiB per call (the working tree included), so the GGUF travels in two parts
# (data/transfer/, made by prepare_data.py) through folders .stage/a, .stage/c and .stage/b (ignored by git)
# that the calls carry:
#   call 1, carry .stage/a (part.aa):  STAGE=1 bash experiments/smollm2/run_on_gpu.sh
#   call 2, carry .stage/c (the gguf wheel, study.tar.xz, the study's code archive): the same
#   call 3, carry .stage/b (part.ab):
#           RUNS=R0 SEED=0 MSA_COMMIT=<commit> bash experiments/smollm2/run_on_gpu.sh
# Each call copies what it carries into /tmp/stage (kept while the machine stays up); later calls of the same
# lease carry nothing. The results of every run are packed into $OUT/results.tar.gz after each run.
# RUNS may name several runs (e.g. "A B"): together they start no new arm after MINUTES from the call's start.
set -uo pipefail
CALL_START=$(date +%s)
OUT=${OUT:-/tmp/smollm2-out}
STAGE_DIR=/tmp/stage
mkdir -p "$STAGE_DIR" "$OUT"
[ -d .stage ] && cp -n .stage/*/* "$STAGE_DIR"/
if [ "${STAGE:-0}" = "1" ]; then ls -l "$STAGE_DIR"; exit 0; fi
cd "$STAGE_DIR" || exit 1
if [ ! -f model.gguf ]; then
    cat part.aa part.ab > model.gguf && rm part.aa part.ab
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  model.gguf" | sha256sum -c - || exit 1
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site gguf-*.whl || exit 1
[ -d data/study ] || { mkdir -p data && tar -xJf study.tar.xz -C data; } || exit 1
cd - > /dev/null
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
RESULTS=/tmp/smollm2-results
mkdir -p "$RESULTS"
status=0
for run in ${RUNS:-R0}; do
    python3 experiments/smollm2/study.py "$run" --seed "${SEED:-0}" --data "$STAGE_DIR/data/study" \
        --base "$STAGE_DIR/model.gguf" --archive "$STAGE_DIR/study.tar.xz" --work /tmp/smollm2 --out "$RESULTS" \
        --minutes "$(python3 -c "print(${MINUTES:-9} - ($(date +%s) - $CALL_START) / 60)")" --commit "${MSA_COMMIT:-}" ${STUDY_ARGS:-} 2>&1 | tee -a "$OUT/study.log"
    status=${PIPESTATUS[0]}
    tar -czf "$OUT/results.tar.gz" -C "$RESULTS" .
    [ "$status" = 0 ] || break
done
exit "$status"
