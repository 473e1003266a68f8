"""Training data: loaders behind ``--data``, packs (memory-mapped, parallel-decoded), latents.

Modules, low to high: decode (one image -> one row), checks (array rules), sources (what a pack
reads), store (the pack's files), pack / latents (writers: ``python -m sgengine.data pack|encode``),
images (ImageData and ``load_data``), packed (``open_pack``), loader (background batches).
"""
from .images import (IMAGE_SUFFIXES, ImageData, list_images, load_array, load_data, load_digits, load_folder,
                     read_image, report_skipped, to_float, to_uint8)
from .loader import BatchLoader
from .sources import np_load
from .packed import is_pack, open_pack

__all__ = ["IMAGE_SUFFIXES", "ImageData", "BatchLoader", "is_pack", "list_images", "load_array", "load_data",
           "load_digits", "load_folder", "np_load", "open_pack", "read_image", "report_skipped", "to_float", "to_uint8"]
