import os
import sys

import torch

# Triton kernels run on the CPU through the interpreter; it must be chosen before any kernel
# module is imported. On a GPU machine the real compiler runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import mor_reference as a plain module
