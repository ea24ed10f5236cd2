"""StreamDiffusion core. torch lives here and nowhere else in `bridge`.

Public API: `StreamEngine` (the per-frame engine), `load_pipeline` (model loading, including
the embedded `tiny` models), `CfgType`, `SimilarityFilter` and `ModelLoadError`.
"""

from bridge.engine.guidance import CfgType
from bridge.engine.similarity import SimilarityFilter
from bridge.engine.stream import EngineStats, StreamEngine

__all__ = ["CfgType", "EngineStats", "SimilarityFilter", "StreamEngine"]
