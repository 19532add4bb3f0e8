import os
import sys

import torch

# the project's modules live at the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny tensors: one thread is faster and keeps two test processes from fighting over cores
torch.set_num_threads(1)
