"""The core layer (numpy only): spec, sampling, statistics maths, numpy oracle, shared types.

Nothing here touches DALI, gRPC or the filesystem beyond reading a statistics file:
`spec` (AugmentSpec), `sampling` (epoch plans and per-sample parameters), `stats`
(RGB statistics and presets), `reference` (the float64 oracle of every op), `types`;
`glibc` (ctypes access to mallopt and malloc_trim, for the loader's and servers' memory).
"""
