"""Compile paged_sparse_attention_kernel for sm_90 without a GPU (QT, W = num_warps, S = num_stages from the
environment) and write its TTGIR to /tmp/ttgir.txt: PYTHONPATH=src QT=8 W=8 S=3 python ttgir_check.py."""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from msa.kernels.paged import paged_sparse_attention_kernel as k
sig = {n: t for n, t in zip(
    ["q", "k", "v", "page_table", "tiles", "block_indices", "block_lists", "out", "partial_out", "partial_lse", "scale_log2"],
    ["*bf16", "*bf16", "*bf16", "*i32", "*i32", "*i64", "*i32", "*bf16", "*bf16", "*bf16", "fp32"])}
const = dict(HQ=64, G=4, R=16, RP=16, D=128, BLOCK_SIZE=128, MAX_PAGES=1600, TOPK=16, TOPKP=16, QT=int(__import__("os").environ.get("QT","8")), SPLIT=1, UPCAST=False)
for n, v in const.items():
    sig[n] = "constexpr"
src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()}, attrs={(i,): [["tt.divisibility", 16]] for i in range(10)})
c = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=int(__import__("os").environ.get("W","8")), num_stages=int(__import__("os").environ.get("S","3"))))
open("/tmp/ttgir.txt", "w").write(c.asm["ttgir"])
open("/tmp/ptx.txt", "w").write(c.asm["ptx"])
print("ok")
