#!/usr/bin/env bash
# Nsight Compute "speed of light" of every MSA kernel at one length, on the device machine:
#     OUT=/some/dir bash scripts/gpu_profile.sh [seqlen]
set -uo pipefail
OUT=${OUT:-/tmp/msa-profile}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 benchmarks/profile_kernels.py "${1:-32768}"  # compile outside the profiler
ncu --section SpeedOfLight --section Occupancy --csv --page details \
    -k regex:'select_blocks|sparse_attention|merge_partials|index_kl' \
    python3 benchmarks/profile_kernels.py "${1:-32768}" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
echo "ncu exit $?"; tail -3 "$OUT/ncu.err"
python3 - "$OUT/ncu.csv" <<'PY' | tee "$OUT/ncu_summary.txt"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
header, rows = rows[0], rows[1:]
col = {name: header.index(name) for name in ("Kernel Name", "Metric Name", "Metric Value", "Metric Unit")}
keep = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "DRAM Throughput", "L2 Cache Throughput",
        "Achieved Occupancy", "Registers Per Thread", "Dynamic Shared Memory Per Block")
for r in rows:
    if r[col["Metric Name"]] in keep:
        print(f'{r[col["Kernel Name"]][:40]:40s} {r[col["Metric Name"]]:34s} {r[col["Metric Value"]]} {r[col["Metric Unit"]]}')
PY
