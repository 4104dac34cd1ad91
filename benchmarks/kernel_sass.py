"""Static cost of the Triton ELSA kernels: compile them for a GPU architecture and read the machine code.

No GPU is needed: Triton compiles for an explicit target (default sm_90, the H100/H200) with the ptxas it
ships, and ``cuobjdump`` (also shipped) gives the SASS and the resource usage. For each kernel, ghost variant
and candidate tile of ``elsa.ops.triton.op`` (K = 7, 32 channels per head as in ELSA-Swin, bfloat16, fused
softmax) it reports:

- registers per thread and spill bytes (``STACK``; anything above 0 means local-memory traffic);
- SASS instructions issued per element and neighbour: the instructions of the loop body over neighbours
  divided by the (channel, pixel) elements one thread handles in it. The op is a gather-multiply-add with
  49 neighbours, so this count, not DRAM traffic, bounds the kernels on a GPU: at about 4 warp-instructions
  per clock per SM, N instructions per element-neighbour take N * elements * 49 / 32 / (4 * SMs * clock).

    python benchmarks/kernel_sass.py                 # sm_90, writes benchmarks/results/kernel_sass_sm90.json
    python benchmarks/kernel_sass.py --arch 80       # A100

The figures predict, they do not measure: timings come from benchmarks/op_bench.py on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the caller's environment says
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402

try:
    import elsa  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from elsa.ops.triton import kernels, op  # noqa: E402
from elsa.ops.triton.aot import compile_for  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
KERNEL_SIZE, CHANNELS = 7, 32
# (name, has ghost_mul, has ghost_add): ELSA-Swin uses the additive ghost only (lam = 0).
VARIANTS = [("additive ghost", False, True), ("both ghosts", True, True)]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(BIN / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def loops(sass: str) -> list[dict]:
    """Every backward branch as a loop: its address range, instruction count, opcode counts, nesting."""
    instrs = []
    for m in SASS_LINE.finditer(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
        instrs.append((int(m.group(1), 16), text.split()[0].split(".")[0], text))
    spans = []
    for addr, opcode, text in instrs:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text) if opcode == "BRA" else None
        if target and target.group(1) and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    found = []
    for start, end in spans:
        body = [opcode for a, opcode, _ in instrs if start <= a <= end]
        nested = sum(1 for s, e in spans if (s, e) != (start, end) and start <= s and e <= end)
        found.append(dict(start=start, end=end, instructions=len(body), nested=nested,
                          opcodes=collections.Counter(body)))
    return found


def per_element(kernel_loops: list[dict], elements: float, channel_trips: int) -> tuple[float, dict]:
    """Instructions per element and neighbour, and the opcode mix of the loop over neighbours.

    The neighbour loop is the innermost loop holding the loads; in the attention-gradient kernel it holds a
    loop over channel blocks (``channel_trips`` trips), counted that many times.
    """
    innermost = max((lp for lp in kernel_loops if lp["nested"] == 0), key=lambda lp: lp["opcodes"]["LDG"])
    if channel_trips == 0:
        return innermost["instructions"] / elements, dict(innermost["opcodes"])
    outer = min((lp for lp in kernel_loops if lp["nested"] >= 1 and lp["start"] <= innermost["start"]
                 and innermost["end"] <= lp["end"]), key=lambda lp: lp["instructions"])
    issued = outer["instructions"] + innermost["instructions"] * (channel_trips - 1)
    return issued / (elements * channel_trips), dict(innermost["opcodes"])


def analyse(name: str, fn, constexprs: dict, tile: tuple[int, int, int], dtype: str, arch: int,
            channel_loop: bool) -> dict:
    block_c, block_p, warps = tile
    compiled = compile_for(fn, dict(constexprs, BLOCK_C=block_c, BLOCK_P=block_p), dtype=dtype, num_warps=warps,
                           arch=arch)
    cubin = compiled.asm["cubin"]
    usage = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", _cuobjdump(cubin, "--dump-resource-usage")))
    elements = block_c * block_p / (32 * warps)
    trips = -(-CHANNELS // block_c) if channel_loop else 0
    cost, mix = per_element(loops(_cuobjdump(cubin, "-sass")), elements, trips)
    keep = ("LDG", "STG", "LDL", "STL", "FFMA", "IMAD", "PRMT", "SHFL", "BAR", "MUFU")
    return dict(kernel=name, block_c=block_c, block_p=block_p, num_warps=warps, elements_per_thread=elements,
                registers=int(usage["REG"]), spill_bytes=int(usage["STACK"]), shared_bytes=int(usage["SHARED"]),
                instructions_per_element_neighbour=round(cost, 2),
                inner_loop_opcodes={k: mix.get(k, 0) for k in keep if mix.get(k, 0)})


def kernel_cases(has_mul: bool, has_add: bool) -> list[tuple[str, object, dict, list, bool]]:
    geometry = dict(K=KERNEL_SIZE, DIL=1, STRIDE=1, SOFTMAX=True)
    gather = dict(geometry, HAS_MUL=has_mul, HAS_ADD=has_add)
    return [
        ("forward", kernels.elsa_fwd_kernel, gather, op.GATHER_TILES, False),
        ("grad_attn+ghosts", kernels.elsa_bwd_attn_kernel,
         dict(geometry, HAS_MUL=has_mul, WRITE_LSE=True, NEED_ATTN=True, NEED_MUL=has_mul, NEED_ADD=has_add),
         op.REDUCE_TILES, True),
        ("grad_v", kernels.elsa_bwd_v_kernel, gather, op.GATHER_TILES, False),
    ]


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--json", default=None, help="default benchmarks/results/kernel_sass_sm<arch>.json")
    args = parser.parse_args(argv)

    rows = []
    for variant, has_mul, has_add in VARIANTS:
        for name, fn, constexprs, tiles, channel_loop in kernel_cases(has_mul, has_add):
            for tile in tiles:
                if tile[0] > CHANNELS:  # pruned at this channel count (op._prune_channel_blocks)
                    continue
                flags = dict(constexprs, EVEN_C=CHANNELS % tile[0] == 0)
                if channel_loop:
                    flags["ALL_C"] = CHANNELS <= tile[0]
                row = dict(variant=variant, **analyse(name, fn, flags, tile, args.dtype, args.arch, channel_loop))
                rows.append(row)
                print(f"{variant:15s} {name:17s} C{tile[0]:<3d} P{tile[1]:<4d} w{tile[2]}  "
                      f"regs {row['registers']:3d}  spill {row['spill_bytes']:4d} B  "
                      f"{row['instructions_per_element_neighbour']:5.1f} instr/element/neighbour", flush=True)

    result = dict(
        benchmark="kernel_sass", date=datetime.date.today().isoformat(), target=f"sm_{args.arch}",
        dtype=args.dtype, kernel_size=KERNEL_SIZE, channels_per_head=CHANNELS, triton=triton.__version__,
        note="static: compiled and disassembled without a GPU; predicts issue cost, measures no time",
        rows=rows,
    )
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / f"kernel_sass_sm{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from elsa.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
