"""qvit: low-bit quantization of vision transformers and efficient CNNs, on timm models.

    import qvit
    model = qvit.build_model("deit_tiny_patch16_224", checkpoint="deit_tiny.pth")
    qmodel = qvit.quantize_ptq(model, "minmax", calib_images, w_bits=4, a_bits=4)
"""
from . import quantizers
from .config import QuantConfig
from .quantizers import QuantSpec, create_quantizer, list_quantizers, NotCalibratedError
from .models import (REFERENCE_MODEL, build_model, create_reference_model, describe, format_sites, iter_quantizers,
                     prepare, unprepare)
from .calibration import calibrate, uncalibrated_sites
from .ptq import quantize_ptq
from .recipes import Recipe, list_recipes, load_recipe
from .evaluate import EvalResult, evaluate

__version__ = "0.1.0"
