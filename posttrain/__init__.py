"""posttrain: LLM post-training and reward modeling from one recipe file."""

import os

# Set before torch is imported anywhere: with libgomp's default active spin-waiting, tiny-model steps on a
# 2-core machine run 15-50x slower (see docs/performance.md). Users can still override both.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
