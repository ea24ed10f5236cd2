"""Model acceleration: the seam between `StreamEngine` and its backends.

The spelling (`engine.acceleration`, parsed by `Acceleration`) is in bridge/acceleration.py.
Network-level backends change which `Networks` a frame calls: `compile` (accel/compile.py) and
TensorRT engines (accel/engine_networks.py over tensorrt.py, onnx_export.py, engine_cache.py,
streams.py).
The frame-level one, `cuda_graph` (accel/graphs.py), changes how the frame runs.
`StreamEngine` asks this package for both and knows nothing of the backends.
"""

from __future__ import annotations

from bridge.acceleration import ACCELERATIONS, Acceleration
from bridge.engine.accel.networks import Networks

__all__ = ["ACCELERATIONS", "Acceleration", "Networks"]
