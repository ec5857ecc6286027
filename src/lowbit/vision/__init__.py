"""Convolutional networks: architectures lowbit builds (MobileNetV2), batch-norm folding, shipped
photos for calibration and evaluation, the quantization pipeline for Conv2d + Linear models, and
fidelity to the float model (top-1 agreement, KL)."""
