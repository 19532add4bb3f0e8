import os
import sys

import torch

# the project's modules live at the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny tensors: one thread is faster and keeps two test processes from fighting over cores
torch.set_num_threads(1)


import pytest


@pytest.fixture(autouse=True)
def eager_training_unless_asked(request, monkeypatch):
    """Tests train eager: compiling one model's step takes tens of seconds on a CPU. Tests of the
    compile default itself carry @pytest.mark.compile_default; the others pass --compile to compile."""
    if request.node.get_closest_marker("compile_default"):
        return
    import train
    monkeypatch.setattr(train, "MODELS", {name: entry._replace(cpu_compile=False) for name, entry in train.MODELS.items()})
