"""Which records a training step sees: DDP shards, per-dataset weights and the weighted sampler."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import DistributedSampler

from ctseg.config import plain
from ctseg.errors import ConfigError


def shard(records: Sequence[Any], rank: int, world_size: int, seed: int = 0,
          pad: bool = True) -> list[Any]:
    """The records of DDP rank `rank`: a seeded permutation split round-robin, disjoint and
    covering. `pad` repeats records so every rank gets ceil(len / world_size) (training steps
    stay in step); without it (evaluation, where a repeat would count a subject twice) ranks
    differ by at most one record, and only fewer records than ranks are padded to one each."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    if not records:
        return []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    total = math.ceil(len(order) / world_size) * world_size if pad else max(len(order),
                                                                             world_size)
    padded = [order[i % len(order)] for i in range(total)]
    return [records[i] for i in padded[rank::world_size]]


def check_dataset_weights(weights: Mapping[str, float] | None, names: Sequence[str]
                          ) -> dict[str, float] | None:
    """data.dataset_weights as {dataset name: weight}, every name a dataset's and the weights
    non-negative with a positive sum; None (sampling proportional to size) when not given."""
    if not weights:
        return None
    weights = plain(weights)
    if not isinstance(weights, dict):
        raise ConfigError(f"data.dataset_weights: expected a mapping dataset name: weight, got "
                          f"{weights!r}")
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ConfigError(f"data.dataset_weights: {unknown[0]!r} is not a dataset (the datasets: "
                          f"{', '.join(names)})")
    try:
        checked = {str(k): float(v) for k, v in weights.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"data.dataset_weights: weights must be numbers, got {weights}") from None
    if any(v < 0 or not math.isfinite(v) for v in checked.values()) or not sum(checked.values()):
        raise ConfigError(f"data.dataset_weights: weights must be >= 0 with a positive sum, got "
                          f"{checked}")
    return checked


def dataset_shares(datasets: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each dataset's share of the training draws: its weight over those of the datasets the
    training records (named by their dataset) come from; a dataset not in `weights` gets none."""
    present = dict.fromkeys(datasets)
    total = sum(weights.get(name, 0.0) for name in present)
    if not total:
        raise ConfigError(f"data.dataset_weights: {dict(weights)} gives no weight to a dataset "
                          f"with training subjects ({', '.join(sorted(present))})")
    return {name: weights.get(name, 0.0) / total for name in present}


def sampling_weights(datasets: Sequence[str], shares: Mapping[str, float]) -> list[float]:
    """Per training record (named by its dataset), the weight that draws each dataset with its
    share; records of one dataset equally."""
    sizes = Counter(datasets)
    return [shares[name] / sizes[name] for name in datasets]


class WeightedDraws(DistributedSampler):
    """As many draws per epoch as records, with replacement, by `weights` (seeded by seed and
    epoch). A DistributedSampler of one replica, like the unweighted loaders under DDP, so that
    Lightning does not split this rank's already sharded records again."""

    def __init__(self, dataset: TorchDataset, weights: Sequence[float], seed: int) -> None:
        """Draw indices of `dataset` with probability proportional to `weights`."""
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.weights = torch.tensor(weights, dtype=torch.double)

    def __iter__(self) -> Iterator[int]:
        """This epoch's draws."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.multinomial(self.weights, self.num_samples, replacement=True,
                                      generator=generator).tolist())
