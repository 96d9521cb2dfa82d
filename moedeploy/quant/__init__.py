"""Weight-only quantized experts: formats (`formats.py`: int8 and int4, group-wise scales, torch's packed
CPU kernels and their dequantise-then-matmul references) and the quantized expert bank (`bank.py`); experts of
pre-quantized checkpoints (`mxfp4.py`, `fp8.py`, `ondisk.py`: reading them; `prequantized.py`: their bank)."""

from .bank import QuantizedBank
from .formats import EXPERT_DTYPES, QuantSpec

__all__ = ["EXPERT_DTYPES", "QuantSpec", "QuantizedBank"]
