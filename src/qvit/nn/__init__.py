"""Quantized modules swapped in for timm's own classes (registry: float class -> quantized class)."""
from ._registry import quant_class_for, register_quant_module, registered_float_classes
from .base import QuantModule
from .quant_linear import QuantLinear
from .quant_conv import QuantConv2d
from .quant_attention import QuantAttention
from .quant_window_attention import QuantWindowAttention
from .quant_mlp import QuantMlp
from .weight_site import WeightSite
