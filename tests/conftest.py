"""Test-wide setup. Triton kernels run on CPU through Triton's interpreter when no GPU is present; the variable
must be set before any kernel is defined, so it is set here, before the tests import elsa."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("ELSA_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
