"""The names of the input and output kinds: the schema `bridge.config` checks `input.kind` and
`outputs[*].kind` against, and the set `bridge.transports.registry` opens. It imports nothing,
so the config and the registry both sit above it (neither imports the other to learn them)."""

SOURCE_KINDS = ("synthetic", "image", "video", "camera", "shm", "spout", "syphon", "ndi")
SINK_KINDS = ("shm", "preview", "null", "spout", "syphon", "ndi", "virtualcam")
VENDOR_KINDS = ("video", "camera", "spout", "syphon", "ndi", "virtualcam")  # need an optional library
