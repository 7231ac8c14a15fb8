from .reference import REFERENCE_MODEL, create_reference_model, reference_weights_id, reference_weights_path
from .prepare import SiteInfo, describe, format_sites, iter_quantizers, iter_weight_sites, prepare, unprepare
from .roles import role_prefix, stem_and_head
from .factory import build_model
from .state import QuantState, quant_state
from .transforms import TRANSFORMS, apply_transforms, list_transforms, register_transform
