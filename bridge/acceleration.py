"""`engine.acceleration`: backends and tuning switches joined by '+'. No torch here: the config
validates it, the engine (bridge/engine/accel/) acts on it.

| part              | what it does                                                             |
|-------------------|--------------------------------------------------------------------------|
| `none`            | eager torch kernels: the exact path (alone)                              |
| `compile`         | torch.compile (inductor) on the UNet, VAE encoder and decoder            |
| `tensorrt`        | TensorRT engines for the UNet and the VAE (the `tensorrt` extra)         |
| `cuda_graph`      | the whole frame captured as one CUDA graph per layout                    |
| `channels_last`   | the UNet and VAE weights in channels-last memory format                  |
| `cudnn_benchmark` | cuDNN times its convolution algorithms and keeps the fastest (process-wide) |

`compile` and `tensorrt` both replace the networks, so at most one of them. `ACCELERATIONS` is
the menu the parameter table offers; any valid combination is accepted. `channels_last` and
`cudnn_benchmark` are off unless asked: they are kept where `sdbridge bench` measures that they
help on a given GPU (docs/benchmarks.md), and they change which kernels run, so a frame with
them is close to the exact path, not bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

# inductor's modes for `compile`. Not the ones with inductor's own CUDA graphs (reduce-overhead,
# max-autotune): they clash with an engine that feeds a frame's outputs into the next and keeps
# them across skips, and the engine captures the whole frame itself (`cuda_graph`).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_MODE = "default"
ACCELERATIONS = ("none", "compile", "cuda_graph", "compile+cuda_graph", "tensorrt", "tensorrt+cuda_graph")
PARTS = ("compile", "tensorrt", "cuda_graph", "channels_last", "cudnn_benchmark")


@dataclass(frozen=True)
class Acceleration:
    """A parsed `engine.acceleration`."""

    compile: bool = False
    tensorrt: bool = False
    cuda_graph: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def parse(cls, text: str | Acceleration) -> Acceleration:
        """`none`, or parts joined by '+' in any order (`cuda_graph+compile` is `compile+cuda_graph`).
        Raises ValueError naming what is wrong."""
        if isinstance(text, Acceleration):
            return text
        if not isinstance(text, str):
            raise ValueError(f"acceleration must be a string such as 'cuda_graph', got {text!r}")
        spelled = text.strip().lower()
        if spelled == "none":
            return cls()
        parts = [p.strip() for p in spelled.split("+")]
        unknown = [p for p in parts if p not in PARTS]
        why = ""
        if unknown:
            why = f" ({', '.join(map(repr, unknown))} is not one of {', '.join(PARTS)})"
        elif len(set(parts)) != len(parts):
            why = " (a part twice)"
        elif "compile" in parts and "tensorrt" in parts:
            why = " (compile and tensorrt both replace the networks: choose one)"
        if why:
            raise ValueError(
                f"acceleration must be none or parts joined by '+', such as {', '.join(ACCELERATIONS[1:])}; "
                f"got {text!r}{why}"
            )
        return cls(**{name: name in parts for name in PARTS})

    def __str__(self) -> str:
        return "+".join(name for name in PARTS if getattr(self, name)) or "none"

    @property
    def replaces_networks(self) -> bool:
        """Whether frames call other networks than the pipe's own modules (compiled ones or
        built engines), which can fail where the exact torch modules would not."""
        return self.compile or self.tensorrt

    @property
    def exact(self) -> bool:
        """Whether frames are bit for bit those of the eager path: graphs replay the eager
        kernels; inductor and TensorRT fuse ops without rounding to fp16 between them, and the
        tuning switches pick other convolution kernels."""
        return not (self.compile or self.tensorrt or self.channels_last or self.cudnn_benchmark)
