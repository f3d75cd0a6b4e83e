"""The CPU runtime under every family: fused kernels, our native decoding steps (``csrc``),
quantized and expert layers, and streaming weights from disk under a memory limit."""
