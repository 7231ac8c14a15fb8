from .steps import PTQContext, list_steps, register_step
from .pipeline import quantize_ptq
from .reparam import find_post_ln_pairs, match_reparameterized_state, reparameterize_post_ln
from .reconstruct import find_units, qdrop, quantizers_enabled
from .interval_search import find_search_ops, interval_search
