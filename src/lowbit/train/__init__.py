"""Training for low bits: quantization-aware training with fake-quantized layers (`fake_quant`),
distillation to the float model (`qat`), and `lowbit train` (`run`)."""

from .fake_quant import FakeQuantLinear
from .qat import QATConfig, QATResult, TrainError, convert, prepare, train
from .run import train_model

__all__ = ["FakeQuantLinear", "QATConfig", "QATResult", "TrainError", "convert", "prepare", "train", "train_model"]
