"""`DataModuleFromConfig`: train/validation/test data sets built from config sections, as in the
original `main.py` (configs name it `main.DataModuleFromConfig`)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.base import Txt2ImgIterableBaseDataset
from ldm.errors import UserInputError
from ldm.util import instantiate_from_config


class WrappedDataset(Dataset):
    """A map-style view of any object with `__len__` and `__getitem__`."""

    def __init__(self, dataset: Any):
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(worker_id: int) -> None:
    """Give each data-loader worker its own numpy seed and, for iterable data sets, its share of the ids."""
    worker_info = torch.utils.data.get_worker_info()
    dataset = worker_info.dataset
    if isinstance(dataset, Txt2ImgIterableBaseDataset) and dataset.valid_ids is not None:
        split_size = dataset.num_records // worker_info.num_workers
        dataset.sample_ids = dataset.valid_ids[worker_id * split_size:(worker_id + 1) * split_size]
    np.random.seed((torch.initial_seed() + worker_id) % 2 ** 32)


class DataModuleFromConfig(pl.LightningDataModule):
    """Data sets from `train`, `validation`, `test` and `predict` configs, loaded in batches of `batch_size`."""

    def __init__(self, batch_size: int, train: Optional[Mapping] = None, validation: Optional[Mapping] = None,
                 test: Optional[Mapping] = None, predict: Optional[Mapping] = None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False):
        super().__init__()
        if batch_size < 1:
            raise UserInputError(f"data.params.batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.dataset_configs = {name: config for name, config in
                                (("train", train), ("validation", validation), ("test", test), ("predict", predict))
                                if config is not None}
        self.datasets: dict[str, Any] = {}

    def prepare_data(self) -> None:
        self.setup()

    def setup(self, stage: Optional[str] = None) -> None:
        for name, config in self.dataset_configs.items():
            if name in self.datasets:
                continue
            dataset = instantiate_from_config(config)
            if len(dataset) == 0:
                raise UserInputError(f"the {name} data set ({config['target']}) is empty; check its data_root")
            self.datasets[name] = WrappedDataset(dataset) if self.wrap else dataset

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[name]
        iterable = isinstance(dataset, Txt2ImgIterableBaseDataset)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          shuffle=shuffle and not iterable, persistent_workers=self.num_workers > 0,
                          worker_init_fn=worker_init_fn if (iterable or self.use_worker_init_fn) else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def has(self, name: str) -> bool:
        """Whether a `name` data set ("train", "validation", ...) is configured."""
        return name in self.dataset_configs
