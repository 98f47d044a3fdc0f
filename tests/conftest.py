import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

# The test models are tiny: one intra-op thread is faster than two that spin-wait on each
# other (and than two competing with anything else on a two-core machine).
torch.set_num_threads(1)
