"""One torch thread per test module (tests/conftest.py): the machine is shared, and several threads thrash when
the cores are busy."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
