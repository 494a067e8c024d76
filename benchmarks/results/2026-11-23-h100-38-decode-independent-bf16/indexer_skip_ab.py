import json, os, torch
from msa import kernels
from msa.fp8 import quantize_rows
res = {}
for seqlen in (131072, 524288):
    iq = torch.randn(seqlen, 4, 128, device="cuda", dtype=torch.bfloat16)
    ik = torch.randn(seqlen, 1, 128, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    (q8, _), (k8, ks) = quantize_rows(iq), quantize_rows(ik[:, 0])
    def timed(fn, reps=3):
        fn(); torch.cuda.synchronize(); ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
        return sorted(ts)[len(ts) // 2]
    outs = {}
    for skip in (False, True):
        kernels.INDEXER_SKIP = skip
        res[f"{seqlen} bf16 skip={skip}"] = timed(lambda: kernels.select_blocks(iq, ik, cu, seqlen, 128, 16))
        res[f"{seqlen} fp8 skip={skip}"] = timed(lambda: kernels.select_blocks(q8, k8, cu, seqlen, 128, 16, index_k_scale=ks))
        outs[skip] = (kernels.select_blocks(iq, ik, cu, seqlen, 128, 16), kernels.select_blocks(q8, k8, cu, seqlen, 128, 16, index_k_scale=ks))
    res[f"{seqlen} identical"] = all(torch.equal(a, b) for a, b in zip(outs[False], outs[True]))
    print(res, flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "indexer_skip_ab.json"), "w"), indent=1)
