from .fashion_mnist import DatasetMissingError, FashionMNIST, load_fashion_mnist
from .datasets import build_dataset, calibration_batch, create_loader, resolve_split_dir, subset
from .transforms import create_eval_transform, model_data_config
