"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) without a GPU.

The interpreter tests run the kernels' logic; this runs Triton's real compiler (to PTX, then
`ptxas` shipped with Triton) on the launch configurations the code picks, in a subprocess with
the interpreter off. It checks what the bandwidth design relies on: K/V loads are pipelined
(`cp.async`), the half-precision products use tensor cores (`mma`; Hopper's `wgmma` in the
prefill kernel), and every default tile fits in an SM's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KiB); sm_80: 163 KiB
SMEM_LIMIT_SM80 = 166912


def _compile_all() -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vattn_ray.attention import triton_decode as td
    from vattn_ray.attention import triton_prefill as tp
    from vattn_ray.model import fused_kernels as fk

    def build(fn, types: dict, consts: dict, arch: int, warps: int, stages: int) -> dict:
        sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
        # What a launch specializes on: 16-byte aligned pointers and strides divisible by 16 (true of
        # the KV views, whose strides are multiples of head_dim, and of fresh allocations).
        aligned = [i for i, name in enumerate(fn.arg_names)
                   if name.endswith(("_ptr", "_addr")) or name.startswith("stride")]
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = k.asm["ptx"]
        return {"kernel": fn.__name__, "arch": arch, "shared": k.metadata.shared,
                "cp_async": "cp.async" in ptx,  # cp.async, or TMA's cp.async.bulk
                "mma": "mma.sync" in ptx or "wgmma" in ptx, "wgmma": "wgmma" in ptx,
                "consts": {c: str(v) for c, v in consts.items()}}

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    out = []
    # (dtype, head_dim, GQA group, arch, 64-bit slot strides, both DIRECT variants)
    for dtype, dim, group, arch, wide, both in [(torch.bfloat16, 128, 4, 90, False, True),
                                                (torch.bfloat16, 128, 8, 80, False, False),
                                                (torch.bfloat16, 64, 1, 90, True, False),
                                                (torch.float32, 128, 4, 90, False, False)]:
        t = names[dtype]
        types = {"q_ptr": f"*{t}", "k_addr": "i64", "v_addr": "i64", "out_ptr": f"*{t}", "part_out_ptr": "*fp32",
                 "part_lse_ptr": "*fp32", "slots_ptr": "*i64", "seq_lens_ptr": "*i32", "rows_ptr": "*i64",
                 "scale_log2": "fp32"}
        if wide:  # slots of more than 2^31 elements: the slot strides arrive as 64-bit integers
            types.update(stride_ks="i64", stride_vs="i64")
        cfg = td.default_config(dim, dtype)
        for direct in (False, True) if both else (False,):
            consts = dict(GROUP=group, GROUP_PAD=16, HEAD_DIM=dim, BLOCK_N=cfg.block_n, HAS_ROWS=not direct,
                          DIRECT=direct, PRECISION="ieee" if dtype == torch.float32 else "tf32",
                          KV_DTYPE={torch.bfloat16: triton.language.bfloat16,
                                    torch.float32: triton.language.float32}[dtype])
            rec = build(td._decode_split_kernel, types, consts, arch, cfg.num_warps, cfg.num_stages)
            out.append(dict(rec, dtype=t))
        if both:
            merge = dict(HEAD_DIM=dim, BLOCK_N=cfg.block_n, SPLITS_PAD=td.MAX_SPLITS, HAS_ROWS=True)
            out.append(dict(build(td._decode_merge_kernel, types, merge, arch, 4, 1), dtype=t))
    # The prefill kernel on Hopper at both head sizes, with 64-bit slot strides at D=128.
    for dim, wide in [(128, True), (64, False)]:
        types = {"q_ptr": "*bf16", "k_addr": "i64", "v_addr": "i64", "out_ptr": "*bf16", "slots_ptr": "*i64",
                 "seq_lens_ptr": "*i32", "cu_q_ptr": "*i32", "block_rows_ptr": "*i32", "block_starts_ptr": "*i32",
                 "scale_log2": "fp32"}
        if wide:
            types.update(stride_ks="i64", stride_vs="i64")
        cfg = tp.default_config(dim, torch.bfloat16)
        consts = dict(GROUP=4, HEAD_DIM=dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION="tf32",
                      KV_DTYPE=triton.language.bfloat16)
        out.append(dict(build(tp._prefill_kernel, types, consts, 90, cfg.num_warps, cfg.num_stages), dtype="bf16"))
    ptrs = {n: "*bf16" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr", "q_ptr", "k_ptr", "v_ptr",
                                 "cos_ptr", "sin_ptr", "q_out_ptr", "kc_ptr", "vc_ptr")}
    ptrs.update(map_ptr="*i64", eps="fp32", kc_addr="i64", vc_addr="i64")
    for fn, consts, warps in [(fk._rms_norm_kernel, dict(BLOCK=4096, HAS_RESIDUAL=True), 8),
                              (fk._rms_norm_kernel, dict(BLOCK=128, HAS_RESIDUAL=False), 1),
                              (fk._silu_mul_kernel, dict(BLOCK=1024), 4),
                              (fk._rope_cache_kernel, dict(BLOCK_HQ=32, BLOCK_HKV=8, HALF=64,
                                                           KV_DTYPE=triton.language.bfloat16), 4)]:
        out.append(dict(build(fn, ptrs, consts, 90, warps, 1), dtype="bf16"))
    return out


def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    split = [r for r in records if r["kernel"] == "_decode_split_kernel"]
    assert len(split) == 5 and {r["arch"] for r in split} == {80, 90}
    for r in split:
        assert r["cp_async"], f"K/V loads are not pipelined: {r}"
        assert r["shared"] <= (SMEM_LIMIT if r["arch"] == 90 else SMEM_LIMIT_SM80), f"tile too large: {r}"
        if r["dtype"] != "fp32":
            assert r["mma"], f"no tensor-core product: {r}"
    prefill = [r for r in records if r["kernel"] == "_prefill_kernel"]
    assert {r["consts"]["HEAD_DIM"] for r in prefill} == {"64", "128"}
    for r in prefill:  # K/V tiles pipelined, products on Hopper's warpgroup tensor cores, tiles that fit
        assert r["cp_async"] and r["wgmma"] and r["shared"] <= SMEM_LIMIT, f"prefill kernel: {r}"
    assert {r["kernel"] for r in records} == {"_decode_split_kernel", "_decode_merge_kernel", "_rms_norm_kernel",
                                              "_silu_mul_kernel", "_rope_cache_kernel", "_prefill_kernel"}


if __name__ == "__main__":
    print(json.dumps(_compile_all()))
