"""Crash-safe file writing: a file is either the old one or the complete new one, never half-written."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Tuple, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _out_of_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk space (or quota), seen through the writers' own exceptions."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _full_after(err: BaseException, path: Path, margin: int = 1 << 20) -> bool:
    """torch.save reports a full disk as "unexpected pos 5321984 vs 5321872": take it as one only when the
    destination's file system is indeed (nearly) full."""
    if "unexpected pos" not in str(err):
        return False
    try:
        return shutil.disk_usage(path.parent).free < margin
    except OSError:
        return False


def remove_stale_temporaries(folder: PathLike) -> List[Tuple[Path, int]]:
    """Delete the ``.NAME.XXXX.tmp`` files that writers killed mid-write (SIGKILL, power loss) left in ``folder``
    (each as large as the file it was replacing); returns (path, bytes) of each. Called when a run starts."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(".*.tmp"):
            if stale.is_file():
                size = stale.stat().st_size
                stale.unlink(missing_ok=True)
                removed.append((stale, size))
    return removed


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the file, then rename it over ``path`` (atomic on POSIX).

    The temporary file sits in the destination directory (same filesystem) and is removed if ``write`` fails.
    Temporaries of ``path`` that an earlier, killed writer left behind (``.NAME.*.tmp``, checkpoint-sized) are
    removed first: each file has one writer (rank 0). The file gets the permissions the umask gives a new file
    (mkstemp would leave 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _out_of_space(err) or _full_after(err, path):
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} (the previous file, if "
                                        f"any, is intact); free some space or choose another --output",
                          str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (JSON results, metrics, run arguments)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_safetensors(state_dict: dict, path: PathLike, metadata: dict | None = None) -> Path:
    """Write tensors as ``.safetensors`` atomically (contiguous copies; shared storage is not allowed there)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def torch_save(obj: object, path: PathLike) -> Path:
    """``torch.save`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_png(fig, path: PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
