"""INT8 W8A8 quantization: primitives, smoothing and clipping, Int8Linear, calibration, checkpoints.

See docs/int8.md.
"""
