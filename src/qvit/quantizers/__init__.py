"""Quantizer families, one per file, constructible by name from a :class:`QuantSpec`."""
from ._registry import get_quantizer_class, list_quantizers, register_quantizer
from .base import NotCalibratedError, Quantizer, quantizer_parameters
from .spec import QuantSpec
from .ranges import list_ranges, register_range
from .uniform import UniformQuantizer
from .lsq import LSQPlusQuantizer, LSQQuantizer
from .factory import create_quantizer
from .statsq import StatsQQuantizer
from .pow2 import Pow2Quantizer
from .twin_uniform import TwinUniformQuantizer
from .log2 import Log2Quantizer, LogSqrt2Quantizer
from .tanq import TanQQuantizer
from .sulq import SULQQuantizer
