"""Model acceleration: the seam between `StreamEngine` and its backends.

`engine.acceleration` names a set of backends joined by '+':

| spelling             | what it does                                                       |
|----------------------|--------------------------------------------------------------------|
| `none`               | eager torch kernels: the exact path                                |
| `compile`            | torch.compile (inductor) on the UNet, VAE encoder and decoder      |
| `cuda_graph`         | the whole frame captured as one CUDA graph per layout (exact)      |
| `compile+cuda_graph` | compiled kernels replayed inside the frame graph                   |
| `tensorrt`           | TensorRT engines for the UNet and VAE (`accel/engine_networks.py`) |
| `tensorrt+cuda_graph`| TensorRT engines replayed inside the frame graph                   |

Module-level backends (`compile`; TensorRT engines, `accel/tensorrt.py`) change which
`Networks` a frame calls; the frame-level one (`cuda_graph`, `accel/graphs.py`) changes how the
frame runs. `StreamEngine` asks this package for both and knows nothing of the backends.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.engine.accel.networks import Networks

__all__ = ["ACCELERATIONS", "Acceleration", "Networks"]

ACCELERATIONS = ("none", "compile", "cuda_graph", "compile+cuda_graph", "tensorrt", "tensorrt+cuda_graph")
_PARTS = ("compile", "tensorrt", "cuda_graph")


@dataclass(frozen=True)
class Acceleration:
    """A parsed `engine.acceleration`."""

    compile: bool = False
    cuda_graph: bool = False
    tensorrt: bool = False

    @classmethod
    def parse(cls, text: str | Acceleration) -> Acceleration:
        """`none`, or backends joined by '+' in any order (`cuda_graph+compile` is `compile+cuda_graph`)."""
        if isinstance(text, Acceleration):
            return text
        if not isinstance(text, str):
            raise ValueError(f"acceleration must be a string such as 'cuda_graph', got {text!r}")
        spelled = text.strip().lower()
        if spelled == "none":
            return cls()
        parts = [p.strip() for p in spelled.split("+")]
        unknown = [p for p in parts if p not in _PARTS]
        why = ""
        if unknown:
            why = f" ({', '.join(map(repr, unknown))} is not a backend)"
        elif len(set(parts)) != len(parts):
            why = " (a backend twice)"
        elif "compile" in parts and "tensorrt" in parts:
            why = " (compile and tensorrt both replace the networks: choose one)"
        if why:
            raise ValueError(f"acceleration must be one of {', '.join(ACCELERATIONS)}, got {text!r}{why}")
        return cls(compile="compile" in parts, cuda_graph="cuda_graph" in parts, tensorrt="tensorrt" in parts)

    def __str__(self) -> str:
        parts = [name for name in _PARTS if getattr(self, name)]
        return "+".join(parts) or "none"

    @property
    def exact(self) -> bool:
        """Whether frames are bit for bit those of the eager path (graphs replay eager kernels;
        inductor and TensorRT fuse elementwise ops without fp16 rounding between them)."""
        return not (self.compile or self.tensorrt)
