"""Every fact about the known datasets, defined once (docs/DESIGN.md §2.1).

`normalization` is the "encoder usage info": the mean/std an encoder pre-trained on that set expects.
Downstream-only sets have none, since images are always normalised with the *encoder's* statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import DataError

DATA_ROOT = Path('data')

GTSRB_CLASSES = (
    'Speed limit 20', 'Speed limit 30', 'Speed limit 50', 'Speed limit 60', 'Speed limit 70',
    'Speed limit 80', 'End of speed limit 80', 'Speed limit 100', 'Speed limit 120', 'No passing',
    'No passing for vehicles over 3.5t', 'Right-of-way at the next intersection', 'Priority road',
    'Yield', 'Stop', 'No vehicles', 'Vehicles over 3.5t prohibited', 'No entry', 'General caution',
    'Dangerous curve to the left', 'Dangerous curve to the right', 'Double curve', 'Bumpy road',
    'Slippery road', 'Road narrows on the right', 'Road work', 'Traffic signals', 'Pedestrians',
    'Children crossing', 'Bicycles crossing', 'Beware of ice/snow', 'Wild animals crossing',
    'End of all speed and passing limits', 'Turn right ahead', 'Turn left ahead', 'Ahead only',
    'Go straight or right', 'Go straight or left', 'Keep right', 'Keep left', 'Roundabout mandatory',
    'End of no passing', 'End of no passing for vehicles over 3.5t')
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
DIGITS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
SHAPES = ('disc', 'ring', 'square', 'frame', 'triangle', 'cross', 'horizontal stripes',
          'vertical stripes', 'checkerboard', 'diagonal stripes')


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    splits: dict[str, int]  # split -> number of images of the real set (synthetic: default size)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    image_size: int = 32
    pretraining_split: str = 'train'  # the split SimCLR pre-trains on and BadEncoder shadows
    synthetic: bool = False
    extra: dict = field(default_factory=dict)
    resized_from: str | None = None  # prepared from this set's npz splits, resized to image_size
    packaged: str | None = None  # read from this installed Python package (its pip name), not from raw files

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def can_pretrain(self) -> bool:
        return self.normalization is not None


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo('cifar10', CIFAR10_CLASSES,
                {'train': 50000, 'test': 10000},
                ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))),
    DatasetInfo('stl10', ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship',
                          'truck'),
                {'train': 5000, 'test': 8000, 'train_unlabeled': 100000},
                ((0.44087798, 0.42790666, 0.38678814), (0.25507198, 0.24801506, 0.25641308)),
                pretraining_split='train_unlabeled'),
    # The released code's shadow set for the 224-pixel encoders (CLIP, ImageNet): CIFAR10's images at 224, its
    # data/cifar10/train_224.npz (docs/DESIGN.md §2.6); normalised as the encoder expects, like every set here.
    DatasetInfo('cifar10_224', CIFAR10_CLASSES, {'train': 50000, 'test': 10000}, image_size=224,
                resized_from='cifar10'),
    DatasetInfo('gtsrb', GTSRB_CLASSES, {'train': 39209, 'test': 12630}),
    DatasetInfo('svhn', DIGITS, {'train': 73257, 'test': 26032}),
    # Real handwritten digits that need no download: the 1797 8x8 images scikit-learn's wheel ships
    # (sklearn.datasets.load_digits), upscaled to 32x32; train = the first 1000, test = the other 797.
    DatasetInfo('sklearn_digits', DIGITS, {'train': 1000, 'test': 797}, packaged='scikit-learn'),
    # The project's own offline sets (datasets/synthetic.py). The normalisation of the synthetic
    # pre-training set is a nominal one: mid-grey mean, quarter-range spread.
    DatasetInfo('synthetic_shapes', SHAPES, {'train': 10000, 'test': 2000},
                ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), synthetic=True),
    DatasetInfo('synthetic_digits', DIGITS, {'train': 5000, 'test': 1000}, synthetic=True),
]}

UNLABELED_SPLITS = ('train_unlabeled',)


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}', expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def pretraining_names() -> list[str]:
    """Sets an encoder can be pre-trained on (they define the encoder's normalisation)."""
    return [name for name, info in DATASETS.items() if info.can_pretrain]


def default_data_dir(name: str) -> Path:
    """`data/<name>/`, the one convention all stages share."""
    return DATA_ROOT / name


def split_path(name: str, split: str, data_dir: str | Path | None = None) -> Path:
    return Path(data_dir if data_dir else default_data_dir(name)) / f'{split}.npz'
