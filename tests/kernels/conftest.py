"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is imported (``triton.jit`` reads it when a kernel
module is imported), so it is set here, at the top of the directory's conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config) -> None:
    # triton 3.6's interpreter converts 1-element arrays to ints the way numpy 2.x deprecates
    config.addinivalue_line(
        "filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning"
    )
