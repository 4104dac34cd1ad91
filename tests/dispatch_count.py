"""A TorchDispatchMode that records the aten ops a piece of code runs (the layers' no-copy tests)."""
from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """``with CountOps() as mode: ...`` then ``mode.ops``: the op packets' names, in call order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))
