"""One device rule for every command (elsa.engine.resolve_device)."""
import pytest
import torch

from elsa import benchmarking
from elsa.engine import resolve_device


def test_default_and_auto_pick_cuda_only_when_present():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    assert benchmarking.resolve_device("cpu") == "cpu"


def test_bad_devices_name_the_flag():
    with pytest.raises(ValueError, match=r"--device: 'gpu0' is not a device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device: 'cuda' was asked for but CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            benchmarking.resolve_device("cuda:1")
