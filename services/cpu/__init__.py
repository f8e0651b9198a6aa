"""The CPU fast path: native GEMV linear layers, weights on huge pages, rotary tables, heap trimming, kernels."""
