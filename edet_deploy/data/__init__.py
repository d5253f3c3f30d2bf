"""Datasets: the generated shapes set and COCO-format datasets on disk, behind one interface."""
from .coco import CocoDataset, find_split
from .shapes import SHAPE_CLASSES, generate_shapes, sample_image

__all__ = ["CocoDataset", "find_split", "SHAPE_CLASSES", "generate_shapes", "sample_image"]
