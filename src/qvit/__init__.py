"""qvit: low-bit quantization of vision transformers and efficient CNNs, on timm models.

    import qvit
    model = qvit.build_model("deit_tiny_patch16_224", checkpoint="deit_tiny.pth")
    result = qvit.quantize(model, "repq", calib_images, w_bits=4, a_bits=4)     # PTQ or QAT recipes alike
    qvit.save(result.model, "deit_tiny_w4a4.safetensors")
"""
from . import kernels, quantizers
from .backend import Backend, get_backend, set_backend
from .runtime import Settings, get_settings, set_settings, settings
from .config import QuantConfig
from .quantizers import QuantSpec, create_quantizer, list_quantizers, NotCalibratedError
from .models import (REFERENCE_MODEL, QuantState, build_model, create_reference_model, describe, format_sites,
                     iter_quantizers, prepare, quant_state, unprepare)
from .calibration import calibrate, uncalibrated_sites
from .ptq import quantize_ptq
from .recipes import Recipe, list_recipes, load_recipe
from .evaluate import EvalResult, evaluate
from .api import QuantizeResult, export_onnx, load, quantize, save

__version__ = "0.1.0"
