"""fedbrain: privacy-preserving federated learning for brain-tumour MRI classification on NVIDIA FLARE."""

from fedbrain.contract import CLASSES, Preprocessing

__version__ = "0.1.0"
__all__ = ["CLASSES", "Preprocessing", "__version__"]
