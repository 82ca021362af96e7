"""Images and datasets: decode any image file to RGB, and list folders or manifests as stable examples."""

from sightline.data.datasets import DATASET_KINDS, Example, ImageDataset, open_dataset
from sightline.data.images import IMAGE_EXTENSIONS, is_image_file, load_image

__all__ = [
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "Example",
    "ImageDataset",
    "is_image_file",
    "load_image",
    "open_dataset",
]
