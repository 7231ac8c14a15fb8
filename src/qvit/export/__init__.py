"""Deployable forms of quantized models: packed low-bit checkpoints and ONNX."""
from .checkpoint import PackedCheckpointError, load_quantized, read_metadata, save_quantized
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["PackedCheckpointError", "load_quantized", "read_metadata", "save_quantized", "pack_codes",
           "packed_nbytes", "unpack_codes"]
