"""Scratch: decode attention time vs forced KV split, overlapping selections (not part of the repo)."""
import sys, json
sys.path.insert(0, "benchmarks")
import inference as bench
from msa.inference import PagedSparseAttention
out = []
for split in (1, 2, 4, 8):
    PagedSparseAttention._split = lambda self, s=split: s
    for batch, seqlen in ((8, 131072), (8, 200000), (32, 200000)):
        row = bench.decode_case(batch, seqlen, 8, int(60e9), 30.5)
        out.append(dict(split=split, batch=batch, seqlen=seqlen, msa_ms=row["msa_ms"], attention_ms=row["attention_ms"], dense_ms=row["dense_ms"], speedup=row["speedup"]))
        print(json.dumps(out[-1]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
