"""SR data: MATLAB-compatible bicubic, training patches, benchmark sets, the built-in photo set.

    imresize(x, scale)                    MATLAB imresize (bicubic, antialiased) of (B, C, H, W) tensors
    PairedFolderDataset(hr_dir, s, p)     random aligned (lr, hr) training patches with flips / rotations
    SeededPatches(dataset, seed)          the same, crops and flips seeded by the patch's place in the run
    BenchmarkFolder(root, s)              (name, lr, hr) of Set5/HR + LR_bicubic/X4 or a plain HR folder
    write_builtin_photos(root)            real photos from scikit-image and sporco as train/val PNG folders
    read_builtin_photo(name)              one of them as (H, W, 3) uint8
"""
from .builtin import BUILTIN_PHOTOS, BuiltinPhoto, read_builtin_photo, write_builtin_photos
from .datasets import BenchmarkFolder, PairedFolderDataset, SeededPatches
from .images import bicubic_lr, list_images
from .resize import cubic, imresize, resize_matrix

__all__ = ["imresize", "resize_matrix", "cubic", "bicubic_lr", "list_images", "PairedFolderDataset", "SeededPatches",
           "BenchmarkFolder", "write_builtin_photos", "read_builtin_photo", "BUILTIN_PHOTOS", "BuiltinPhoto"]
