import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU the Triton kernels run under the interpreter (read when the kernels are first imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
