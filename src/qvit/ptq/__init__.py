from .calibrate import calibrate, iter_batches, uncalibrated_sites
from .steps import PTQContext, list_steps, register_step
from .pipeline import quantize_ptq, recipe_config
