"""benchmarks/kernel_sass.py's whole-kernel count on a hand-written SASS listing: loops weighted by their trip
counts, and a source loop the compiler unrolled counted once per copy, not matched to another SASS loop."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernel_sass():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_sass.py"
    spec = importlib.util.spec_from_file_location("kernel_sass", path)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TRITON_INTERPRET")
    try:  # the script compiles for a GPU and drops TRITON_INTERPRET; the other tests need it as it was
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return module


def _listing(lines: list[str]) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(lines))


# A softmax-statistics loop the compiler unrolled (its copy: one MUFU), then a loop over neighbour rows around a
# loop over neighbour columns. The row loop also holds a MUFU and no HMMA, like the statistics loop would.
SASS = _listing([
    "IMAD R1, R2, R3, RZ",
    "MUFU.EX2 R4, R5",
    "FFMA R6, R7, R8, R9",    # rows loop starts
    "MUFU.EX2 R4, R5",        # columns loop starts
    "FFMA R6, R7, R8, R9",
    "@P0 BRA 0x30",           # columns loop ends
    "@P1 BRA 0x20",           # rows loop ends
    "EXIT",
])
LOOPS = [("softmax stats", 49), ("neighbour rows", 7, [("neighbour columns", 7)])]


def test_unrolled_innermost_loop_is_not_matched_to_a_nesting_loop(kernel_sass):
    count = kernel_sass.whole_kernel(SASS, LOOPS)
    loops = {loop["name"]: loop["sass"] for loop in count["loops"]}
    assert loops == {"neighbour rows": ["0x20", "0x60"], "neighbour columns": ["0x30", "0x50"],
                     "softmax stats": "unrolled"}
    # IMAD, MUFU and EXIT once; FFMA and BRA of the row loop 7 times; the column loop's three 7 * 7 times
    assert count["instructions"] == 3 + 2 * 7 + 3 * 49
    assert count["opcodes"]["MUFU"] == 1 + 49


def test_loops_that_match_nothing_are_refused(kernel_sass):
    with pytest.raises(RuntimeError, match="do not match"):
        kernel_sass.whole_kernel(SASS, [("softmax stats", 49)])
