import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Triton kernels run in the interpreter on machines without a GPU; the variable must be set
# before the kernels are defined (imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEBUG", "1")  # device_assert fires only with debug on
