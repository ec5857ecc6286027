"""lowbit's own fast runtime: packed integer weights multiplied without a float copy.

`kernels` compiles a small C library (AVX-512 where the machine has it, OpenMP over output rows)
on first use with the system's C compiler and caches it; `packed` holds a layer's weights in the
layout the kernels read and runs the product. Without a compiler (or with LOWBIT_NO_EXT=1) the
layers dequantize in PyTorch as before.
"""
