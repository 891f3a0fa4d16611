"""Run last in the pytest process (by name): the tests before it left the process fit for what users do next.

Setuptools' distutils hack switches itself off for the whole process once anything imports `pip`; inductor
(torch.compile on the CPU) imports setuptools, which then fails with an AssertionError naming distutils/core.py.
A test that imported pip in-process broke the compiled-training test in CI this way."""
import sys


def test_no_test_imported_pip_into_the_pytest_process():
    assert "pip" not in sys.modules, "a test imported pip in-process: use importlib.metadata or a subprocess"

