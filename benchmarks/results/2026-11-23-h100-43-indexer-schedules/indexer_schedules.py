"""A/B of the indexer's two schedules on the paper's layer (G=4, Di=128, block 128, top-16), bf16 and FP8
index vectors, at 128K, 512K and 1M: select_blocks one pass (its default config) against two phases
(several configs). Writes indexer_schedules.json under argv[1]."""
import json, os, sys, datetime
import torch
sys.path.insert(0, "benchmarks")
from msa import kernels
from msa.cli.timing import median_ms
from msa.fp8 import quantize_rows

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
res = dict(device=torch.cuda.get_device_name(), commit=os.environ.get("MSA_COMMIT"),
           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=[])
runs = [("one_pass", (64, 4, 3, 128))] + [("two_phase", c) for c in
        [(256, 8, 3, 128), (128, 8, 3, 128), (64, 4, 3, 128), (128, 8, 3, 256), (256, 8, 2, 128), (256, 8, 4, 128)]]
for seqlen in (131072, 524288, 1048576):
    gen = torch.Generator(device="cuda").manual_seed(0)
    iq = torch.randn(seqlen, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    ik = torch.randn(seqlen, 1, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    (fq, _), (fk, fs) = quantize_rows(iq), quantize_rows(ik[:, 0])
    inputs = {"bf16": ((iq, ik), {}), "fp8": ((fq, fk), dict(index_k_scale=fs))}
    warm, reps = (2, 5) if seqlen < 500000 else (1, 3)
    for dtype, (args, kw) in inputs.items():
        ref = kernels.select_blocks(*args, cu, seqlen, 128, 16, (64, 4, 3, 128), two_phase=False, **kw)
        for schedule, config in runs:
            run = lambda: kernels.select_blocks(*args, cu, seqlen, 128, 16, config,
                                                two_phase=schedule == "two_phase", **kw)
            try:
                same = (run().sort(-1).values == ref.sort(-1).values).all(-1).float().mean().item()
                ms = median_ms(run, torch.device("cuda"), warmup=warm, repeats=reps)
            except Exception as error:
                ms, same = str(error).splitlines()[0][:100], None
            row = dict(seqlen=seqlen, dtype=dtype, schedule=schedule, config=config, ms=ms, identical_rows=same)
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            open(f"{out}/indexer_schedules.json", "w").write(json.dumps(res, indent=2))
    del iq, ik, fq, fk, fs, ref
    torch.cuda.empty_cache()
