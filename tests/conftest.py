"""Test-wide setup. Triton kernels run on CPU through Triton's interpreter when no GPU is present; the variable
must be set before any kernel is defined, so it is set here, before the tests import elsa."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("ELSA_BACKEND", None)  # tests choose backends explicitly

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: the machine is shared, and tiny models run faster on one thread
    (several thrash when other jobs hold the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kill_after_checkpoint():
    """``kill(cmd, checkpoint)``: start ``cmd`` (one thread per process), wait for ``checkpoint`` to appear, let
    the run go on a moment (into the next step, or the next checkpoint write: either way files must stay whole),
    then SIGKILL it. Fails if the run ends or errs before it could be killed."""
    import signal
    import subprocess
    import time

    def kill(cmd, checkpoint, after_s: float = 0.5, timeout_s: float = 240) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MKL_NUM_THREADS="1")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + timeout_s
            while not checkpoint.exists():
                assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-3000:]}"
                assert time.time() < deadline, f"no checkpoint after {timeout_s} s"
                time.sleep(0.1)
            time.sleep(after_s)
            assert proc.poll() is None, "the run finished before it could be killed; make it longer"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()

    return kill
