"""Build ``kernel.cpp`` once per machine and load it with ctypes.

Why not ``torch.utils.cpp_extension``: the kernel needs no torch headers, and a plain C ABI builds in about
10 s on a 2-core CPU instead of the minute a torch extension takes; ctypes releases the GIL during the call.
Why not inductor: it generates code per shape (recompiling for every new input size) and cannot fuse the
softmax and the K*K loop the way one hand-written pass does.

The library is cached under ``$ELSA_CACHE_DIR`` (default ``~/.cache/elsa``), named by a hash of the source,
the compiler's version, the flags and the CPU's instruction-set flags (``-march=native`` code must not move
to another CPU). It is written atomically, so concurrent first uses (DDP ranks, test workers) are safe.
Failure is never raised from here: ``load()`` returns None and ``failure()`` tells why.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

_log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernel.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
ABI_VERSION = 2

_failure: Optional[str] = None


def cache_dir() -> Path:
    root = os.environ.get("ELSA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "elsa")
    return Path(root) / "cpp"


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags()]).encode())
    return cache_dir() / f"elsa_cpu_{key.hexdigest()[:16]}.so"


def _compile(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        start = time.perf_counter()
        result = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
        _log.info("built the ELSA CPU kernel in %.1f s: %s", time.perf_counter() - start, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=None)
def load() -> Optional[ctypes.CDLL]:
    """The kernel library, built on first use; None (with ``failure()`` set and logged once) when it cannot be."""
    global _failure
    try:
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        path = library_path(cxx)
        if not path.exists():
            _log.info("building the ELSA CPU kernel (once per machine) into %s", path.parent)
            _compile(cxx, path)
        lib = ctypes.CDLL(str(path))
        if lib.elsa_cpu_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{path} has ABI {lib.elsa_cpu_abi_version()}, expected {ABI_VERSION}")
        lib.elsa_cpu_run.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.elsa_cpu_run.restype = ctypes.c_int
        _failure = None
        return lib
    except Exception as err:  # noqa: BLE001 - any failure means: use the native backend instead
        _failure = f"the compiled CPU kernel is unavailable ({err})"
        _log.warning("%s; the 'native' backend runs instead", _failure)
        return None


def failure() -> Optional[str]:
    """Why ``load()`` returned None (None when it has not failed)."""
    return _failure
