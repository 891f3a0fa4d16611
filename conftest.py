"""The test harness's environment, for the tests and for every notebook nbval runs.

- ADAPTERLIB_RUNS: runs go to a temporary runs root, so `make test` never writes to runs/ and the
  notebooks under nbval never pick up a user's run;
- ADAPTERLIB_DEFAULT_PRESET=smoke: a notebook or command that names no preset runs the seconds-long
  `smoke` preset (users get `shapes`: the notebooks' own defaults never size a run).
Kernels started by nbval and papermill inherit this environment.
"""
import os
import tempfile


def pytest_configure(config):
    os.environ["ADAPTERLIB_RUNS"] = tempfile.mkdtemp(prefix="adapterlib-test-runs-")   # even if the user set one
    os.environ["ADAPTERLIB_DEFAULT_PRESET"] = "smoke"
