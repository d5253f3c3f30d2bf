from .efficientdet import EfficientDet, create_model
from .weights import load_weights, save_weights

__all__ = ["EfficientDet", "create_model", "load_weights", "save_weights"]
