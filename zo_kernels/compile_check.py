"""Compiles every variant of the kernels for a CUDA target without a GPU (ptxas included).

    python -m zo_kernels.compile_check [arch]     # prints one JSON line per variant

Needs the real compiler: run it with TRITON_INTERPRET unset (the tests use a subprocess).
Each line reports what a reviewer would grep the PTX for: approximate math instructions
(the noise contract forbids them) and the global load/store widths (interior tiles should
use 16-byte vectors when the tensors are aligned).
"""
from __future__ import annotations

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget

from . import noise_axpby
from .tensor_table import VECTOR_BYTES

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
POINTER_ARGS = ("base_ptr", "rows_ptr", "block_map_ptr", "seeds_ptr", "scales_ptr")
DIVISIBLE_16 = [["tt.divisibility", 16]]  # what the launcher's specialization gives pointers


def source(dtype: str, rademacher: bool, aligned: bool) -> triton.compiler.ASTSource:
    kernel = noise_axpby.noise_axpby_kernel
    signature = {"base_ptr": f"*{dtype}", "rows_ptr": "*i64", "block_map_ptr": "*i32",
                 "seeds_ptr": "*i64", "scales_ptr": "*fp32", "n_seeds": "i32"}
    constexprs = {"RADEMACHER": rademacher, "LIBDEVICE": True, "ALIGNED": aligned,
                  "VEC": VECTOR_BYTES // ELEMENT_BYTES[dtype], "BLOCK": noise_axpby.BLOCK}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): DIVISIBLE_16 for name in POINTER_ARGS}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


def report(dtype: str, rademacher: bool, aligned: bool, arch: int) -> dict:
    compiled = triton.compile(source(dtype, rademacher, aligned), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": noise_axpby.NUM_WARPS})
    ptx = compiled.asm["ptx"]
    return {"dtype": dtype, "rademacher": rademacher, "aligned": aligned, "arch": arch,
            "cubin_bytes": len(compiled.asm["cubin"]),
            "approx": sorted(set(re.findall(r"\b\w+\.approx[\w.]*", ptx))),
            "loads": sorted(set(re.findall(r"\bld\.global[\w.]*", ptx))),
            "stores": sorted(set(re.findall(r"\bst\.global[\w.]*", ptx)))}


def main(arch: int = 90) -> None:
    if noise_axpby.INTERPRETED:
        sys.exit("compile_check needs the compiler: unset TRITON_INTERPRET")
    for dtype in ELEMENT_BYTES:
        for rademacher in (False, True):
            for aligned in (True, False):
                print(json.dumps(report(dtype, rademacher, aligned, arch)), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
