"""Static cost of the Triton ELSA kernels: compile them for a GPU architecture and read the machine code.

No GPU is needed: Triton compiles for an explicit target (default sm_90, the H100/H200) with the ptxas it
ships, and ``cuobjdump`` (also shipped) gives the SASS and the resource usage. Each kernel is compiled as a
launch would specialise it (integer arguments equal to 1 become constants, multiples of 16 and the pointers
are marked 16-divisible) for the ELSA-Swin-T stage shapes (batch 128, 32 channels per head, K = 7,
additive ghost, fused softmax) in two layouts: ``layer``, the head-aware call the ELSA layer makes (v and the
logits channels-last as its projections write them, one ghost per head, channels-last gradient), and ``flat``
(contiguous (N, C, H, W) inputs, one head per sample, as ``op_bench.py``'s flat entries), and counted whole:

- every SASS instruction once per program, times the trip counts of the loops around it. The loops are the
  backward branches of the SASS; they are matched, in address order and nesting (and by LOOP_MARKERS), with
  the loops of the kernel's source (``loops`` in ``kernel_cases``). A source loop the compiler unrolled has no
  SASS loop and its copies count once each; the script stops if a SASS loop matches none. Instructions in
  run-time branches are counted as if executed (an upper bound);
- registers, spill bytes, shared memory, tensor-core (HMMA/HGMMA) instructions;
- the bound of each kernel on an H100 and an H200: instruction issue (4 warp-instructions per clock per SM),
  shared memory (128 bytes per clock per SM, no bank conflicts counted), tensor cores (mma.sync taken at half
  the dense peak: 2048 FLOPs per clock per SM) and DRAM (the bytes each kernel must move at the measured
  copy rate; H200: spec ratio).

"SASS instructions per element-neighbour" = thread-instructions of the whole launch / (N * C * H * W * K*K).
Both paths are reported: ``tensor-core`` (kernels_tc.py, what the triton backend runs for fp16/bf16 at stride 1)
and ``cuda-core`` (kernels.py, the fallback), each with the spill-free tile of fewest instructions.

    python benchmarks/kernel_sass.py                 # sm_90, writes benchmarks/results/kernel_sass_sm90.json
    python benchmarks/kernel_sass.py --layouts layer --paths tensor-core --stages stage1 --json /tmp/k.json

The last line is the first layout's (``layer``: what ELSA-Swin runs) tensor-core stage-1 total.

The figures predict, they do not measure: timings come from benchmarks/op_bench.py on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import functools
import json
import math
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
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    import elsa  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from elsa.ops.triton import band, kernels, kernels_tc, op  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
KERNEL_SIZE, CHANNELS, BATCH = 7, 32, 128
# (name, H = W, heads) of ELSA-Swin-T's ELSA stages at 224 (benchmarks/op_bench.py).
STAGES = [("stage1", 56, 3), ("stage2", 28, 6), ("stage3", 14, 12)]
# SMs, clock (GHz), copy bandwidth (GB/s, read + write). H100 SXM: the 3.0 TB/s copy rate measured on these
# machines; H200: the same SMs and clock, copy rate scaled by the spec ratio 4.8 / 3.35.
GPUS = {"H100": (132, 1.98, 3000.0), "H200": (132, 1.98, 3000.0 * 4.8 / 3.35)}
ISSUE_PER_CLK, SHARED_B_PER_CLK, MMA_FLOP_PER_CLK = 4, 128, 2048
LAYOUTS = ("layer", "flat")
FLOAT32_POINTERS = frozenset({"gm_ptr", "gd_ptr", "lse_ptr", "dp_ptr"})


class _AlignedPointer:
    """Stands for a freshly allocated (256-byte aligned) tensor in band.vector_width."""
    @staticmethod
    def data_ptr() -> int:
        return 256


_ALIGNED_PTR = _AlignedPointer()


# ---------------------------------------------------------------------------------------------------------
# compiling and reading SASS

def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(BIN / "cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout


def compile_launch_like(fn, constexprs: dict, ints: dict, dtype: str, num_warps: int, arch: int,
                        num_stages: int = 3):
    """``fn`` compiled as a launch with these integer arguments would specialise it."""
    signature, attrs, constants = {}, {}, dict(constexprs)
    for idx, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FLOAT32_POINTERS else f"*{dtype}"
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def parse(sass: str) -> tuple[list[tuple[int, str, str]], list[tuple[int, int]]]:
    """(instructions as (address, opcode, text), loops as (start, end) address ranges of backward branches)."""
    instrs = []
    for m in SASS_LINE.finditer(sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
        instrs.append((int(m.group(1), 16), text.split()[0], text))
    spans = []
    for addr, opcode, text in instrs:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text) if opcode.startswith("BRA") else None
        if target and target.group(1) and int(target.group(1), 16) < addr:
            spans.append((int(target.group(1), 16), addr))
    return instrs, sorted(spans, key=lambda s: (s[0], -s[1]))


def _depths(spans: list[tuple[int, int]]) -> list[int]:
    return [sum(1 for o in spans if o != s and o[0] <= s[0] and s[1] <= o[1]) for s in spans]


def _flatten(tree: list, depth: int = 0) -> list[tuple[str, int, int]]:
    out = []
    for name, trips, *children in tree:
        out.append((name, trips, depth))
        for child in children:
            out += _flatten(child, depth + 1)
    return out


def _shared_bytes(opcode: str) -> int:
    """Bytes one warp moves through shared memory with this instruction (no bank conflicts)."""
    if opcode.startswith("LDSM"):
        return 128 * int(re.search(r"M88\.?(\d)?", opcode).group(1) or 1) if "M88" in opcode else 512
    if opcode.split(".")[0] in ("LDS", "STS", "ATOMS"):
        width = re.search(r"\.(U8|S8|U16|S16|64|128)\b", opcode)
        return 32 * {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}[width.group(1)] if width else 128
    return 0


# (opcode a loop's SASS body must hold, opcode it must not) to stand for a source loop of this name.
LOOP_MARKERS = {"softmax stats": ("MUFU", "HMMA")}


def match_loops(instrs: list, spans: list, expected: list,
                innermost: frozenset = frozenset()) -> list[tuple[tuple[int, int], tuple[str, int, int]]]:
    """Pairs (SASS loop, source loop), in address order. A source loop with no SASS loop of its depth (and
    marker) next in line was unrolled by the compiler: its copies are straight-line code, counted once each.
    A source loop in ``innermost`` (it has no loops inside) never stands for a SASS loop that has loops inside."""
    depths, pairs, k = _depths(spans), [], 0
    for span, depth in zip(spans, depths):
        body = {op.split(".")[0] for a, op, _ in instrs if span[0] <= a <= span[1]}
        nests = any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in spans)
        while k < len(expected):
            name, _, want = expected[k]
            need, forbid = LOOP_MARKERS.get(name, (None, None))
            k += 1
            if (want == depth and (need is None or need in body) and forbid not in body
                    and not (nests and expected[k - 1] in innermost)):
                pairs.append((span, expected[k - 1]))
                break
        else:
            raise RuntimeError(f"SASS loops {[(hex(a), hex(b)) for a, b in spans]} (depths {depths}) do not "
                               f"match the source loops {expected}: update kernel_cases")
    return pairs


def _innermost(tree: list, depth: int = 0) -> set[tuple[str, int, int]]:
    """The flattened entries (as ``_flatten`` gives them) of the loops with no loop inside."""
    out = set()
    for name, trips, *children in tree:
        if not children:
            out.add((name, trips, depth))
        for child in children:
            out |= _innermost(child, depth + 1)
    return out


def whole_kernel(sass: str, loops_expected: list) -> dict:
    """Warp-instructions of one program, loops weighted by their trip counts, and what they are made of."""
    instrs, spans = parse(sass)
    expected = _flatten(loops_expected)
    pairs = match_loops(instrs, spans, expected, frozenset(_innermost(loops_expected)))
    weighted = collections.Counter()
    shared = hmma = 0.0
    for addr, opcode, _ in instrs:
        w = math.prod(trips for (a, b), (_, trips, _) in pairs if a <= addr <= b)
        weighted[opcode.split(".")[0]] += w
        shared += w * _shared_bytes(opcode)
        if re.match(r"(HMMA|HGMMA|IMMA)", opcode):
            hmma += w
    return dict(instructions=sum(weighted.values()), opcodes=weighted, shared_bytes=shared, mma=hmma,
                loops=[dict(name=n, trips=t, depth=d, sass=[hex(a), hex(b)]) for (a, b), (n, t, d) in pairs]
                + [dict(name=n, trips=t, depth=d, sass="unrolled") for n, t, d in expected
                   if all(e != (n, t, d) for _, e in pairs)])


# ---------------------------------------------------------------------------------------------------------
# the kernels as the triton backend launches them at a stage shape

def _geometry(batch: int, heads: int, side: int, layout: str) -> dict:
    """Sizes and the strides of every tensor of a stride-1 call at one stage, as the triton backend gets them.

    ``layer``: the head-aware call the ELSA layer makes: v a channel slice of the channels-last qkv projection
    output (B, H, W, 2*dim_qk + G*C), logits (B, H, W, G*K*K) as their projection writes them, ghosts
    (G, C, K, K) shared by the batch, grad and the outputs channels-last. ``flat``: the flat form of op_bench.py,
    contiguous (N, C, H, W) v and grad and (N, K*K, H, W) logits with N = batch * heads, one head per sample,
    per-sample ghosts; the op's outputs are channels-last all the same."""
    c, kk, hw = CHANNELS, KERNEL_SIZE ** 2, side * side
    if layout == "layer":
        g, b = heads, batch
        x = 2 * (2 * heads * c // 3) + heads * c  # qkv width: dim_qk = two thirds of dim (a multiple of 8 here)
        gc, gkk = g * c, g * kk
        v = dict(b=hw * x, c=1, h=side * x, w=x)
        grad = dict(b=hw * gc, c=1, h=side * gc, w=gc)
        logits = dict(b=hw * gkk, k=1, h=side * gkk, w=gkk)
        ghost = dict(b=0, g=c * kk, c=kk, i=KERNEL_SIZE, j=1)
        ghost_grad = dict(b=0)
    else:
        g, b = 1, batch * heads
        v = grad = dict(b=c * hw, c=hw, h=side, w=1)
        logits = dict(b=kk * hw, k=hw, h=side, w=1)
        ghost = dict(b=c * kk, g=c * kk, c=kk, i=KERNEL_SIZE, j=1)
        ghost_grad = dict(b=c * kk)
    out = dict(b=hw * g * c, c=1, h=side * g * c, w=g * c)
    ga = dict(b=hw * g * kk, k=1, h=side * g * kk, w=g * kk)
    return dict(C=c, H=side, W=side, Ho=side, Wo=side, G=g, samples=b * g, v=v, grad=grad, logits=logits,
                ghost=ghost, ghost_grad=ghost_grad, out=out, ga=ga)


def _ints(fn, g: dict, prefixes: dict) -> dict:
    """Every integer argument of ``fn``: sizes from g, strides ``s<x>_<dim>`` from the layout of tensor x."""
    out = {}
    for name in fn.arg_names:
        if name in g:
            out[name] = g[name]
        elif re.fullmatch(r"s[a-z]+_[a-z]", name):
            tensor, dim = name[1:].split("_")
            out[name] = g[prefixes[tensor]][dim]
    return out


def _vector_layout(g: dict, tensor: str) -> dict:
    """The arguments band.vector_width reads, for tensor ``tensor`` of the geometry (freshly allocated)."""
    return dict(W=g["W"], src_ptr=_ALIGNED_PTR, **{f"ss_{d}": g[tensor][d] for d in "bchw"})


def kernel_cases(path: str, batch: int, heads: int, side: int, layout: str) -> list[dict]:
    """The launches of one forward + backward of the fused-softmax op with the additive ghost."""
    K, KK, g = KERNEL_SIZE, KERNEL_SIZE ** 2, _geometry(batch, heads, side, layout)
    C, hw, n = CHANNELS, side * side, g["samples"]
    el = 2  # bf16 bytes
    if path == "tensor-core":
        geom = dict(K=K, DIL=1, SOFTMAX=True, UPCAST_DOT=False)

        def vec(w, tensor):  # band.window_vector for the tensor the kernel reads its windows from
            return band.window_vector(dict(_vector_layout(g, tensor), TILE_W=w, K=K, DIL=1))

        band_fn, attn_fn = kernels_tc.elsa_band_kernel, kernels_tc.elsa_band_bwd_attn_kernel

        def band_tiles(tiles, src, **flags):
            return [(dict(BLOCK_C=c, TILE_H=h, TILE_W=w, SPAN=band.span(w, K, 1, vec(w, src)), KP=band.slots(K),
                          EVEN_C=C % c == 0, VEC=vec(w, src), **flags), (warps, stages),
                     n * math.ceil(C / c) * math.ceil(side / h) * math.ceil(side / w))
                    for c, h, w, warps, stages in tiles]

        def attn_tiles(tiles):
            return [(dict(BLOCK_C=c, TILE_H=h, TILE_W=w, SPAN=band.span(w, K, 1, vec(w, "v")), KP=band.slots(K),
                          ALL_C=C <= c, VEC=vec(w, "v"), G_VEC=band.vector_width(_vector_layout(g, "grad"))),
                     (warps, stages), n * math.ceil(side / h) * math.ceil(side / w))
                    for c, h, w, warps, stages in tiles]

        channel_trips = lambda cfg: math.ceil(C / cfg["BLOCK_C"])  # noqa: E731
        return [
            dict(kernel="forward", fn=band_fn, flags=dict(geom, HAS_ADD=True, TRANSPOSED=False),
                 tiles=band_tiles(band.BAND_TILES, "v"), prefixes=dict(s="v", a="logits", d="ghost", o="out"),
                 loops=lambda cfg: [("softmax stats", K), ("neighbour rows", K)],  # statistics: a loop over rows
                 dram=(n * C * hw * 2 + n * KK * hw) * el),
            dict(kernel="grad_logits+ghost", fn=attn_fn,
                 flags=dict(geom, WRITE_LSE=True, NEED_ATTN=True, NEED_ADD=True),
                 tiles=attn_tiles(band.BAND_BWD_TILES),
                 prefixes=dict(g="grad", v="v", a="logits", ga="ga", gd="ghost_grad"),
                 loops=lambda cfg: [("softmax stats", KK),  # unrolled
                                    ("neighbour rows", K, [("channel blocks", channel_trips(cfg))]),
                                    ],  # the softmax backward (KK logits per pixel) is unrolled
                 dram=(n * C * hw * 2 + n * KK * hw * 2) * el + n * KK * hw * 8 + n * hw * 4),
            dict(kernel="grad_v", fn=band_fn, flags=dict(geom, HAS_ADD=True, TRANSPOSED=True),
                 tiles=band_tiles(band.BAND_TILES, "grad"), prefixes=dict(s="grad", a="logits", d="ghost", o="out"),
                 loops=lambda cfg: [("neighbour rows", K)],
                 dram=(n * C * hw * 2 + n * KK * hw) * el + n * hw * 4),
        ]
    geom = dict(K=K, DIL=1, STRIDE=1, SOFTMAX=True)

    def cc_tiles(tiles, all_c=False):
        return [(dict(BLOCK_C=c, BLOCK_P=p, EVEN_C=C % c == 0, **(dict(ALL_C=C <= c) if all_c else {})), (warps, 3),
                 n * (1 if all_c else math.ceil(C / c)) * math.ceil(hw / p)) for c, p, warps in tiles if c <= C]

    return [
        dict(kernel="forward", fn=kernels.elsa_fwd_kernel, flags=dict(geom, HAS_MUL=False, HAS_ADD=True),
             tiles=cc_tiles(op.GATHER_TILES), prefixes=dict(v="v", a="logits", m="ghost", d="ghost", o="out"),
             loops=lambda cfg: [("softmax stats", KK), ("neighbour rows", K, [("neighbour columns", K)])],
             dram=(n * C * hw * 2 + n * KK * hw) * el),
        dict(kernel="grad_logits+ghost", fn=kernels.elsa_bwd_attn_kernel,
             flags=dict(geom, HAS_MUL=False, WRITE_LSE=True, NEED_ATTN=True, NEED_MUL=False, NEED_ADD=True),
             tiles=cc_tiles(op.REDUCE_TILES, all_c=True),
             prefixes=dict(g="grad", v="v", a="logits", m="ghost", ga="ga", gm="ghost_grad"),
             loops=lambda cfg: [("softmax stats", KK),
                                ("neighbour rows", K, [("neighbour columns", K,
                                                        [("channel blocks", math.ceil(C / cfg["BLOCK_C"]))])]),
                                ("softmax backward", KK)],
             # ga float32 written, read back and re-written, then cast to bf16 by torch
             dram=(n * C * hw * 2 + n * KK * hw) * el + n * KK * hw * (4 * 4 + 2) + n * hw * 4),
        dict(kernel="grad_v", fn=kernels.elsa_bwd_v_kernel, flags=dict(geom, HAS_MUL=False, HAS_ADD=True),
             tiles=cc_tiles(op.GATHER_TILES), prefixes=dict(g="grad", a="logits", m="ghost", d="ghost", gv="out"),
             loops=lambda cfg: [("neighbour rows", K, [("neighbour columns", K)])],
             dram=(n * C * hw * 2 + n * KK * hw) * el + n * hw * 4),
    ]


@functools.lru_cache(maxsize=None)
def _compiled(fn, flags: tuple, ints: tuple, dtype: str, warps: int, stages: int, arch: int) -> tuple[dict, str]:
    compiled = compile_launch_like(fn, dict(flags), dict(ints), dtype, warps, arch, stages)
    cubin = compiled.asm["cubin"]
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", _cuobjdump(cubin, "--dump-resource-usage"))}
    usage["dynamic_shared"] = int(compiled.metadata.shared)
    return usage, _cuobjdump(cubin, "-sass")


def analyse(case: dict, cfg: dict, launch: tuple[int, int], programs: int, g: dict, dtype: str, arch: int) -> dict:
    warps, stages = launch
    n, side = g["samples"], g["H"]
    flags = dict(case["flags"], **cfg)
    ints = _ints(case["fn"], g, case["prefixes"])
    usage, sass = _compiled(case["fn"], tuple(sorted(flags.items())), tuple(sorted(ints.items())), dtype, warps,
                            stages, arch)
    count = whole_kernel(sass, case["loops"](cfg))
    element_neighbours = n * CHANNELS * side * side * KERNEL_SIZE ** 2
    warp_instr = count["instructions"] * warps * programs
    tile = {k: v for k, v in cfg.items() if k.startswith(("BLOCK_", "TILE_"))}
    row = dict(kernel=case["kernel"], tile=tile, num_warps=warps, num_stages=stages, programs=programs,
               registers=usage["REG"], spill_bytes=usage["STACK"],
               shared_bytes=usage["SHARED"] + usage["dynamic_shared"],
               sass_per_program_warp=int(count["instructions"]), mma_per_program_warp=int(count["mma"]),
               instructions_per_element_neighbour=round(warp_instr * 32 / element_neighbours, 2),
               loops=count["loops"],
               top_opcodes=dict(count["opcodes"].most_common(10)))
    bounds = {}
    for gpu, (sms, ghz, gbs) in GPUS.items():
        clk = sms * ghz * 1e6  # clocks per ms over all SMs
        t = dict(issue=warp_instr / ISSUE_PER_CLK / clk,
                 shared=count["shared_bytes"] * warps * programs / SHARED_B_PER_CLK / clk,
                 tensor=count["mma"] * warps * programs * 4096 / MMA_FLOP_PER_CLK / clk,
                 dram=case["dram"] / (gbs * 1e6))
        limit = max(t, key=t.get)
        bounds[gpu] = dict(ms={k: round(v, 4) for k, v in t.items()}, bound=limit, bound_ms=round(t[limit], 4))
    row["bounds"] = bounds
    return row


def best_rows(path: str, heads: int, side: int, layout: str, dtype: str, arch: int) -> list[dict]:
    """For each kernel of ``path``: every candidate tile, and the spill-free one of fewest instructions."""
    out = []
    g = _geometry(BATCH, heads, side, layout)
    for case in kernel_cases(path, BATCH, heads, side, layout):
        rows = [analyse(case, cfg, launch, programs, g, dtype, arch) for cfg, launch, programs in case["tiles"]]
        ok = [r for r in rows if r["spill_bytes"] == 0] or rows
        best = min(ok, key=lambda r: r["instructions_per_element_neighbour"])
        keys = ("tile", "num_warps", "num_stages", "registers", "spill_bytes", "instructions_per_element_neighbour")
        out.append(dict(best, candidates=[{k: r[k] for k in keys} for r in rows]))
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--json", default=None, help="default benchmarks/results/kernel_sass_sm<arch>.json")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="layer (the ELSA layer's head-aware channels-last call; the last line's) and/or flat")
    parser.add_argument("--paths", default="cuda-core,tensor-core")
    parser.add_argument("--stages", default=",".join(s[0] for s in STAGES))
    args = parser.parse_args(argv)

    results, totals = [], {}
    layouts = args.layouts.split(",")
    for layout in layouts:
        for path in args.paths.split(","):
            for stage, side, heads in (s for s in STAGES if s[0] in args.stages.split(",")):
                results.append(_stage(path, stage, side, heads, layout, args, totals))

    result = dict(
        benchmark="kernel_sass", date=datetime.date.today().isoformat(), target=f"sm_{args.arch}",
        dtype=args.dtype, kernel_size=KERNEL_SIZE, channels_per_head=CHANNELS, batch=BATCH, triton=triton.__version__,
        gpus={k: dict(sms=v[0], clock_ghz=v[1], copy_gbs=round(v[2])) for k, v in GPUS.items()},
        note=("static: compiled launch-like and disassembled without a GPU; whole kernels, loops weighted by trip "
              "count; predicts issue cost and lower bounds, measures no time. layout 'layer': the ELSA layer's "
              "head-aware call on channels-last maps; 'flat': contiguous (N, C, H, W) inputs, one head per sample"),
        results=results,
    )
    out = Path(args.json) if args.json else Path(__file__).parent / "results" / f"kernel_sass_sm{args.arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from elsa.io import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    key = (layouts[0], "tensor-core", "stage1")
    if key in totals:
        print(f"kernel_sass: stage-1 {args.dtype} fused-softmax forward+backward, whole kernels: "
              f"{totals[key]} SASS instructions per element-neighbour")
    return result


def _stage(path: str, stage: str, side: int, heads: int, layout: str, args, totals: dict) -> dict:
    """Count and print one (layout, path, stage); its forward+backward total goes into ``totals``."""
    rows = best_rows(path, heads, side, layout, args.dtype, args.arch)
    total = round(sum(r["instructions_per_element_neighbour"] for r in rows), 2)
    totals[(layout, path, stage)] = total
    for r in rows:
        b = r["bounds"]
        print(f"{layout:5s} {path:11s} {stage} {r['kernel']:18s} {r['tile']} w{r['num_warps']} s{r['num_stages']}  "
              f"regs {r['registers']:3d} spill {r['spill_bytes']:4d} B  smem {r['shared_bytes']:6d} B  "
              f"{r['instructions_per_element_neighbour']:5.2f} SASS/el-nb  "
              f"mma/prog-warp {r['mma_per_program_warp']:5d}  "
              f"H100 {b['H100']['bound']} {b['H100']['bound_ms']:.3f} ms  "
              f"H200 {b['H200']['bound']} {b['H200']['bound_ms']:.3f} ms", flush=True)
    ms = {gpu: round(sum(r["bounds"][gpu]["bound_ms"] for r in rows), 4) for gpu in GPUS}
    print(f"{layout:5s} {path:11s} {stage} forward+backward: {total} SASS/el-nb, bound {ms['H100']} ms (H100), "
          f"{ms['H200']} ms (H200)", flush=True)
    return dict(layout=layout, path=path, stage=stage, N=BATCH * heads, C=CHANNELS, H=side, W=side, kernels=rows,
                instructions_per_element_neighbour=total, bound_ms=ms)


if __name__ == "__main__":
    main()
