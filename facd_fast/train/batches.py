"""The run's training batches, epoch after epoch, from where its counters say it stopped."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

import torch.distributed as dist

from .. import data as sr_data
from .config import Config, ConfigError
from .data_folders import check_folder, resolve_data_dirs
from .seeding import seed_worker
from .training_state import RunCounters


def run_batches(dataset, sampler: DistributedSampler, counters: RunCounters, config: Config, rank: int,
                device: torch.device) -> Iterator[Tuple[Tensor, Tensor]]:
    """(lr, hr) batches forever; ``counters.epoch`` and ``batches_done_in_epoch`` say where to start, and the
    caller counts the batches it takes (this advances the epoch).

    The order depends only on (seed, epoch): crops and flips are seeded by each patch's place in the
    run, not drawn from the global RNG, so runs with the same seed see the same patches whatever the
    method (:class:`facd_fast.data.SeededPatches`), and a resumed run sees what the first would have.
    """
    train, seed = config["train"], config["run"]["seed"]
    while True:
        sampler.set_epoch(counters.epoch)
        keys = [(counters.epoch, rank, position, index) for position, index in enumerate(sampler)]
        keys = keys[counters.batches_done_in_epoch * train["batch_size"]:]
        yield from DataLoader(
            sr_data.SeededPatches(dataset, seed), batch_size=train["batch_size"], sampler=keys, drop_last=True,
            num_workers=config["data"]["num_workers"], pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(seed * 100003 + counters.epoch),
        )
        counters.epoch += 1
        counters.batches_done_in_epoch = 0


def open_data(config: Config, group) -> Tuple[sr_data.PairedFolderDataset, Optional[sr_data.BenchmarkFolder]]:
    """The training patches and the validation images of ``config`` (folders checked, named by their keys).

    Rank 0 writes the built-in photos and the LR cache; the other ranks wait for it, then read them.
    """
    data, scale = config["data"], config["model"]["scale"]
    if not group.is_main:
        dist.barrier()
    train_dir, val_dir = resolve_data_dirs(config)
    check_folder("data.train_hr_dir", train_dir)
    if val_dir:
        check_folder("data.val_hr_dir", val_dir)
    dataset = sr_data.PairedFolderDataset(
        train_dir, scale, data["patch_size"], lr_dir=data["train_lr_dir"] or None,
        cache_dir=data["cache_dir"] or None, augment=data["augment"], repeat=data["repeat"],
    )
    if group.distributed and group.is_main:
        dist.barrier()
    val_set = sr_data.BenchmarkFolder(val_dir, scale, lr_dir=data["val_lr_dir"] or None) if val_dir else None
    return dataset, val_set


def training_sampler(dataset, config: Config, group) -> DistributedSampler:
    """This rank's share of each epoch, shuffled by (seed, epoch); an error when an epoch holds less than one step."""
    per_step = config["train"]["batch_size"] * group.world_size
    if len(dataset) < per_step:
        raise ConfigError(
            f"the training set has {len(dataset)} patches per epoch, fewer than one step needs "
            f"(train.batch_size x world size = {per_step}); raise data.repeat"
        )
    return DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank, shuffle=True,
                              seed=config["run"]["seed"], drop_last=True)
