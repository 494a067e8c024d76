"""Compile the paged attention kernel for sm_90 without a GPU, with PDL on, and check the PTX holds griddepcontrol."""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from msa.kernels.paged import paged_sparse_attention_kernel as k
sig = {n: t for n, t in zip(
    ["q", "k", "v", "page_table", "tiles", "block_indices", "block_lists", "out", "partial_out", "partial_lse", "scale_log2"],
    ["*bf16", "*bf16", "*bf16", "*i32", "*i32", "*i64", "*i32", "*bf16", "*bf16", "*bf16", "fp32"])}
const = dict(HQ=64, G=4, R=16, RP=16, D=128, BLOCK_SIZE=128, MAX_PAGES=1600, TOPK=16, TOPKP=16, QT=8, SPLIT=1,
             UPCAST=False, PDL=True)
for n, v in const.items():
    sig[n] = "constexpr"
src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(n),): v for n, v in const.items()},
                attrs={(i,): [["tt.divisibility", 16]] for i in range(10)})
c = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=8, num_stages=3, launch_pdl=True))
ptx = c.asm["ptx"]
print([line.strip() for line in ptx.splitlines() if "griddepcontrol" in line], c.metadata.launch_pdl)
