"""Compiles every variant of the kernels for a CUDA target without a GPU (ptxas included).

    python -m zo_kernels.compile_check [arch]         # prints one JSON line per variant
    python -m zo_kernels.compile_check [arch] lazy    # every variant with lazy masks
    python -m zo_kernels.compile_check [arch] eager   # every variant with eager masks
    python -m zo_kernels.compile_check [arch] persistent  # every variant on a persistent grid
    python -m zo_kernels.compile_check [arch] exact   # the same for the exact pass (exact.py)
    python -m zo_kernels.compile_check [arch] exact_lazy   # ... with lazy masks (exact_eager)
    python -m zo_kernels.compile_check [arch] table   # the side table's kernels (exact_table.py)

Needs the real compiler: run it with TRITON_INTERPRET unset (the tests use a subprocess).
Each line reports what a reviewer would grep the PTX for: approximate math instructions
(the noise contract forbids them; the square root's seed is counted apart), the global
load/store widths (interior tiles should use 16-byte vectors when the tensors are aligned),
the Philox calls a thread makes, and for the exact kernel, which is compiled with
enable_fp_fusion=False, the fma instructions (Box-Muller's own, spelled out, and no others);
from ptxas (Triton's own), the registers a thread and the spill bytes, which set how many
blocks an SM holds; and from the SASS (Triton's nvdisasm), the instructions of each seed
loop, and for the plain pass, per element a thread holds in a part (what Gaussian passes,
bound by issue, cost), and the path of an interior tile through an aligned pass (its
instructions, and its compares outside the loops: a masked branch's, hoisted onto it, show).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from . import exact, exact_table, noise_axpby
from .tensor_table import VECTOR_BYTES

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
POINTER_ARGS = ("base_ptr", "rows_ptr", "block_map_ptr", "seeds_ptr", "scales_ptr")
DIVISIBLE_16 = [["tt.divisibility", 16]]  # what the launcher's specialization gives pointers


def plain_config(dtype: str, rademacher: bool, aligned: bool) -> noise_axpby.Tiling:
    """The Tiling the plain pass launches with (noise_axpby.config)."""
    import torch

    return noise_axpby.config(getattr(torch, TORCH_DTYPES[dtype]),
                              "rademacher" if rademacher else "gaussian", aligned)


def source(dtype: str, rademacher: bool, aligned: bool,
           tiling: noise_axpby.Tiling | None = None) -> triton.compiler.ASTSource:
    """The plain kernel as launched for aligned or unaligned tiles, or at ``tiling``."""
    tiling = tiling or plain_config(dtype, rademacher, aligned)
    kernel = noise_axpby.noise_axpby_kernel
    signature = {"base_ptr": f"*{dtype}", "rows_ptr": "*i64", "block_map_ptr": "*i32",
                 "seeds_ptr": "*i64", "scales_ptr": "*fp32", "n_seeds": "i32", "n_tiles": "i32"}
    constexprs = {"RADEMACHER": rademacher, "ALIGNED": aligned,
                  "VEC": VECTOR_BYTES // ELEMENT_BYTES[dtype], "BLOCK": tiling.block,
                  "HALVES": tiling.halves, "LAZY_MASKS": tiling.lazy_masks,
                  "PERSISTENT": tiling.persistent > 0}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): DIVISIBLE_16 for name in POINTER_ARGS}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


# The plain pass's variants besides the defaults: Tiling fields to change (the GPU sweep's).
MODES = {"lazy": {"lazy_masks": True}, "eager": {"lazy_masks": False},
         "persistent": {"persistent": 4}}


def report(dtype: str, rademacher: bool, aligned: bool, arch: int, **changes) -> dict:
    """The plain pass as launched, or with ``changes`` to its Tiling (MODES). A kernel with
    lazy masks holds two copies of its noise code, an interior tile's and a masked one's."""
    tiling = plain_config(dtype, rademacher, aligned)._replace(**changes)
    compiled = triton.compile(source(dtype, rademacher, aligned, tiling),
                              target=GPUTarget("cuda", arch, 32), options=tiling.options())
    # a persistent grid's tiles are all in its loop
    facts = summary(compiled, interior_path=aligned and not tiling.persistent)
    per_part = tiling.block // (tiling.halves * tiling.warps * 32)  # elements a thread
    return {"dtype": dtype, "rademacher": rademacher, "aligned": aligned, "arch": arch,
            **tiling._asdict(), **facts,
            "loop_per_element": [round(n / per_part, 1)
                                 for n in facts["loop_instructions"] or []]}


# The one approximate instruction the kernels may issue: the estimate that sqrt_rn's fast
# path (noise_axpby._sqrt) refines to the rounded square root, once a pair of normals.
SQRT_SEED = "rsqrt.approx.ftz.f32"
# Philox's products: high words (tl.umulhi) or whole ones (noise_axpby._mul_wide's PTX).
PHILOX_MULTIPLY = re.compile(r"\bmul\.hi\.u32|\bmul\.wide\.u32\s[^;]*0x(?:D2511F53|CD9E8D57)", re.I)


def summary(compiled, interior_path: bool = False) -> dict:
    """What the PTX shows: approximate math (but the sqrt seeds, counted apart), fma
    instructions, global load/store widths, Philox's multiplies (20 a call, so they count the
    calls a thread makes); what ptxas reports: registers a thread and spill bytes (None
    without a ptxas); and the SASS's loops, and with ``interior_path`` an interior tile's
    path (an aligned pass's, plain or exact)."""
    ptx = compiled.asm["ptx"]
    sass = _sass(compiled.asm["cubin"])
    approx = re.findall(r"\b\w+\.approx[\w.]*", ptx)
    return {"cubin_bytes": len(compiled.asm["cubin"]),
            "approx": sorted(set(a for a in approx if a != SQRT_SEED)),
            "sqrt_seeds": approx.count(SQRT_SEED),
            "fma": sorted(set(re.findall(r"\bfma\.[\w.]*", ptx))),
            "fma_count": len(re.findall(r"\bfma\.[\w.]*", ptx)),
            "loads": sorted(set(re.findall(r"\bld\.global[\w.]*", ptx))),
            "stores": sorted(set(re.findall(r"\bst\.global[\w.]*", ptx))),
            "philox_multiplies": len(PHILOX_MULTIPLY.findall(ptx)),
            **registers(ptx), **loops(sass), **(interior(sass) if interior_path else {})}


def _sass(cubin: bytes) -> tuple[list[str], dict[str, int]] | None:
    """The SASS instructions and the index each label points at (None without nvdisasm)."""
    tool = _nvdisasm()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, str(path)], capture_output=True, text=True).stdout
    code, labels = [], {}
    for line in sass.splitlines():
        if label := re.match(r"^\s*(\.L_x_\d+):", line):
            labels[label.group(1)] = len(code)
        elif instruction := re.match(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line):
            code.append(instruction.group(1))
    return code, labels


def _nvdisasm() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return str(bundled) if bundled.is_file() else shutil.which("nvdisasm")


def loops(sass) -> dict:
    """The SASS loops (the seed loops: a body a part): the instructions of each body and the
    calls in them (sqrt_rn's slow path was one a pair of normals). None without nvdisasm."""
    if sass is None:
        return {"loop_instructions": None, "loop_calls": None}
    code, labels = sass
    bodies = [code[start:end + 1] for start, end in _loops(code, labels)]
    return {"loop_instructions": [len(b) for b in bodies],
            "loop_calls": sum(" CALL" in f" {i}" for b in bodies for i in b)}


def interior(sass) -> dict:
    """The path of an interior tile through an aligned pass (_interior_path): its SASS
    instructions, each loop once, and its compares outside the loops (a tile's bounds, and
    the element masks of a variant that makes them for every tile). None without nvdisasm."""
    if sass is None:
        return {"interior_instructions": None, "interior_compares": None}
    code, labels = sass
    in_loop = [False] * len(code)
    for start, end in _loops(code, labels):
        in_loop[start:end + 1] = [True] * (end + 1 - start)
    path = _interior_path(code, labels, in_loop)
    return {"interior_instructions": len(path),
            "interior_compares": sum(bool(re.match(r"(@!?P\w+\s+)?ISETP", code[k]))
                                     for k in path if not in_loop[k])}


BRANCH = re.compile(r"\bBRA\s+(?:!?U?P\w+,\s*)?`\((\.L_x_\d+)\)")
# A global access of a tile's data one element at a time: a masked path's (16-byte vectors
# are LDG.E.128 / STG.E.128; the seeds' and scales' loads sit in the seed loops or after them).
SCALAR_DATA = re.compile(r"\b(LDG|STG)\.E(\.U16|\.U8|\.S8)?\s")


def _loops(code: list[str], labels: dict) -> list[tuple[int, int]]:
    """(first, last) instruction of each loop: a branch back."""
    spans = []
    for end, instruction in enumerate(code):
        target = BRANCH.search(instruction)
        if target and labels.get(target.group(1), end + 1) < end:
            spans.append((labels[target.group(1)], end))
    return spans


def _interior_path(code: list[str], labels: dict, in_loop: list[bool]) -> list[int]:
    """The instructions an interior tile of an aligned pass runs, each loop once: from
    the entry, over every forward branch past scalar data accesses and no loop (a masked
    load or store), into everything else, to the EXIT after which no scalar store is left."""
    path, i = [], 0
    while i < len(code):
        instruction = code[i]
        path.append(i)
        if re.match(r"(@!?P\w+\s+)?EXIT\b", instruction):
            rest = code[i + 1:]
            if not instruction.startswith("@") or any(SCALAR_DATA.search(r) for r in rest):
                break
        target = BRANCH.search(instruction)
        if target and labels[target.group(1)] > i:
            j = labels[target.group(1)]
            skipped = range(i + 1, j)
            if not instruction.startswith("@") or (
                    any(SCALAR_DATA.search(code[k]) for k in skipped)
                    and not any(in_loop[k] for k in skipped)):
                i = j
                continue
        i += 1
    return path


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself runs for ``arch`` (3.9 takes a newer one than bin/ptxas for
    sm_90, to match the PTX version it writes), else the bundled one, else the PATH's."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except (ImportError, AttributeError, RuntimeError):
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        return str(bundled) if bundled.is_file() else shutil.which("ptxas")


def registers(ptx: str) -> dict:
    """``ptxas -v`` on the PTX for its own target: registers a thread, spill-store bytes."""
    target = re.search(r"^\.target\s+(sm_(\d+)\w*)", ptx, re.M)
    ptxas = _ptxas(int(target.group(2))) if target else None
    if ptxas is None or target is None:
        return {"registers": None, "spill_bytes": None}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas, f"-arch={target.group(1)}", "-v", str(src), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", log.stderr)
    spills = re.search(r"(\d+) bytes spill stores", log.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) if spills else None}


# The exact kernel's variants: (name, DECODE, ENCODE, ROUNDING, aligned)
EXACT_VARIANTS = (("first", False, True, False, False),  # a=0 -> +eps z, encode
                  ("restore_perturb", True, True, False, True),  # the middle passes
                  ("update_sr", True, False, True, True))  # the last pass, rounding
EXACT_POINTER_ARGS = ("base_ptr", "rows_ptr", "block_map_ptr", "seeds_ptr", "scales_ptr",
                      "codes_ptr", "chunk_base_ptr", "bits_ptr")


def exact_source(dtype: str, rademacher: bool, variant: tuple,
                 config: tuple | None = None) -> triton.compiler.ASTSource:
    """The exact kernel's ``variant`` (EXACT_VARIANTS) as launched, or at ``config``."""
    import torch

    block, _, halves, lazy_masks = config or exact.CONFIG
    kernel = exact.exact_kernel
    _, decode, encode, rounding, aligned = variant
    signature = {"base_ptr": f"*{dtype}", "rows_ptr": "*i64", "block_map_ptr": "*i32",
                 "seeds_ptr": "*i64", "scales_ptr": "*fp32", "n_old": "i32", "n_new": "i32",
                 "codes_ptr": "*i8", "code_base": "i64", "chunk_base_ptr": "*i32",
                 "bits_ptr": "*i32", "tau": "fp32"}
    constexprs = {"DECODE": decode, "ENCODE": encode, "ROUNDING": rounding,
                  "RADEMACHER": rademacher, "ALIGNED": aligned,
                  "VEC": VECTOR_BYTES // ELEMENT_BYTES[dtype],
                  "BIG": exact.BIGS[getattr(torch, TORCH_DTYPES[dtype])],
                  "BLOCK": block, "HALVES": halves, "LAZY_MASKS": lazy_masks}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): DIVISIBLE_16
             for name in (*EXACT_POINTER_ARGS, "code_base")}  # code_base: a multiple of 128
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                     attrs=attrs)


# The exact kernel's mask modes: CONFIG's lazy_masks to use (None: CONFIG's own).
EXACT_MODES = {"exact": None, "exact_lazy": True, "exact_eager": False}


def exact_report(dtype: str, rademacher: bool, variant: tuple, arch: int,
                 lazy_masks: bool | None = None) -> dict:
    config = exact.CONFIG if lazy_masks is None else (*exact.CONFIG[:3], lazy_masks)
    compiled = triton.compile(exact_source(dtype, rademacher, variant, config),
                              target=GPUTarget("cuda", arch, 32),
                              options=exact.launch_options(variant[2], config[1]))
    return {"kernel": "exact", "variant": variant[0], "dtype": dtype, "rademacher": rademacher,
            "aligned": variant[4], "arch": arch, "lazy_masks": config[3],
            **summary(compiled, interior_path=variant[4])}


def table_report(kernel, dtype: str, arch: int) -> dict:
    """The side table's count or fill kernel (exact_table.py) for one dtype."""
    import torch

    signature = {"base_ptr": f"*{dtype}", "rows_ptr": "*i64", "block_map_ptr": "*i32",
                 "counts_ptr": "*i32", "chunk_base_ptr": "*i32", "bits_ptr": "*i32",
                 "code_base": "i64", "tau": "fp32"}
    signature = {name: signature[name] for name in kernel.arg_names if name in signature}
    constexprs = {"BIG": exact.BIGS[getattr(torch, TORCH_DTYPES[dtype])], "ALIGNED": True,
                  "VEC": VECTOR_BYTES // ELEMENT_BYTES[dtype], "BLOCK": exact_table.BLOCK}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {(kernel.arg_names.index(name),): DIVISIBLE_16
             for name in signature if name.endswith("_ptr") or name == "code_base"}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=exact_table.OPTIONS)
    return {"kernel": kernel.__name__, "dtype": dtype, "arch": arch, **summary(compiled)}


def main(arch: int = 90, which: str = "noise") -> None:
    if noise_axpby.INTERPRETED:
        sys.exit("compile_check needs the compiler: unset TRITON_INTERPRET")
    if which not in ("noise", "table", *EXACT_MODES, *MODES):
        sys.exit(f"unknown variant set {which!r}: give none, or one of "
                 f"{', '.join(['table', *EXACT_MODES, *MODES])}")
    for dtype in ELEMENT_BYTES:
        if which == "table":
            for kernel in (exact_table.count_kernel, exact_table.fill_kernel):
                print(json.dumps(table_report(kernel, dtype, arch)), flush=True)
            continue
        for rademacher in (False, True):
            if which in EXACT_MODES:  # every pass kind in bfloat16, the middle passes in all
                for variant in EXACT_VARIANTS:
                    if dtype == "bf16" or variant[0] == "restore_perturb":
                        print(json.dumps(exact_report(dtype, rademacher, variant, arch,
                                                      EXACT_MODES[which])), flush=True)
                continue
            for aligned in (True, False):
                changes = MODES.get(which, {})
                print(json.dumps(report(dtype, rademacher, aligned, arch, **changes)),
                      flush=True)


if __name__ == "__main__":
    main(*(int(a) if a.isdigit() else a for a in sys.argv[1:]))
