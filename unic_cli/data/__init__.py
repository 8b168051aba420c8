"""Image datasets for distillation and probes: decoded and augmented as uint8 on CPU workers.

The training stream is deterministic end to end: each epoch's order is a permutation seeded by
(seed, epoch), and each image's augmentation is drawn from its own generator seeded by
(seed, epoch, image index). Nothing depends on the global RNG, the number of workers, or when the
loader was (re)started, so `TrainLoader.load_state_dict` resumes with pixel-identical batches, and a
run on N processes sees, step for step, the same images and crops as one process with an N-times
larger batch.

Normalisation is not done here: batches stay uint8 [0, 255] and each teacher normalises them on the
device with its own mean/std.

Modules: `source` (which files: folders, WebDataset shards), `image` (decoding and augmentation),
`loader` (training and evaluation loaders).
"""

from unic_cli.data.image import augment_colour, augment_unic, decode_image, load_crop, resize_center_crop
from unic_cli.data.loader import (
    AUGMENTATIONS,
    Batch,
    EvalBatch,
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    open_train_source,
)
from unic_cli.data.source import IMAGE_EXTENSIONS, list_image_folder, open_image_source

__all__ = [
    "AUGMENTATIONS", "IMAGE_EXTENSIONS", "Batch", "EvalBatch", "EvalLoader", "TrainLoader", "augment_colour",
    "augment_unic", "build_eval_loader", "build_train_loader", "decode_image", "list_image_folder", "load_crop",
    "open_image_source", "open_train_source", "resize_center_crop",
]
