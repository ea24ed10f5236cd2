"""Frame sources and sinks. No torch here: a test asserts importing this package leaves it unloaded."""
