"""A/B of select_blocks_kernel variants (same launch as kernels.select_blocks), H100."""
import importlib.util, json, os, sys
import torch, triton
sys.path.insert(0, "src")
from msa import kernels
from msa.kernels import indexer as base

def load(name):
    spec = importlib.util.spec_from_file_location(f"indexer_{name}", f".scratch/indexer_{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); return mod

variants = {"base": base, **{n: load(n) for n in ("noscale", "argmin", "both")}}

def run(mod, iq, ik, cu, seqlen, config=(64, 4, 3, 128)):
    rows, warps, stages, keys = config
    out = torch.empty(seqlen, 4, 16, dtype=torch.int32, device="cuda")
    mod.select_blocks_kernel[(triton.cdiv(seqlen, rows // 4), 1)](
        iq, ik, cu, out, 128 ** -0.5, G=4, GP=4, DI=128, BLOCK_SIZE=128, TOPK=16, KP=16, BLOCK_M=rows // 4,
        BLOCK_N=keys, UPCAST=False, num_warps=warps, num_stages=stages)
    return out

def time_ms(fn, warmup, reps):
    for _ in range(warmup): fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]

res = {}
for seqlen in (131072, 524288):
    g = torch.Generator(device="cuda").manual_seed(seqlen)
    iq = torch.randn(seqlen, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ik = torch.randn(seqlen, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    ref = run(base, iq, ik, cu, seqlen).sort(-1).values
    for rnd in range(2):  # interleaved rounds
        for name, mod in variants.items():
            same = torch.equal(run(mod, iq, ik, cu, seqlen).sort(-1).values, ref)
            ms = time_ms(lambda: run(mod, iq, ik, cu, seqlen), 2, 7 if seqlen < 500000 else 3)
            res.setdefault(f"{seqlen} {name}", []).append(ms)
            print(seqlen, name, rnd, f"{ms:.2f} ms", "same" if same else "DIFFERENT", flush=True)
            res[f"{seqlen} {name} same"] = same
out = os.environ.get("OUT", "/tmp")
json.dump(res, open(f"{out}/indexer_ab.json", "w"), indent=1)
