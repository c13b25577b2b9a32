"""Collation: the rows a loader read from the store, as the torch batch the loss reads.

Sits between the shard reads (`student_train.shard_cache`) and the loss (`student_train.losses`): `collate` turns
one batch's numpy rows into int64 ids and masks, and each target kind the store holds into its tensors
(`storage.targets.collate_targets`: float32 values, [B, L, M] sampled draws padded to the batch's widest position,
the store's tail-bucket id of sampled draws as TAIL_BUCKET, the id the loss expects). The batch's records and this
id are the contract between the loader and the loss; both import them from here.

Legend: B samples in a batch, L positions per sample (`seq_len`), M sampled ids per position (padded to the batch's
maximum).
"""

from __future__ import annotations

import numpy as np
import torch

from storage.targets import collate_targets
from storage.targets.sampled import TAIL_BUCKET, tail_bucket

__all__ = ["TAIL_BUCKET", "Batch", "collate", "tail_bucket"]

Batch = dict[str, torch.Tensor]


def collate(record: dict[str, np.ndarray], ids: np.ndarray, targets: dict) -> Batch:
    """Torch batch of the rows `record` (from `ShardCache.rows`) of the global samples `ids`, of a store with the
    manifest section `targets`."""
    batch = {
        "input_ids": torch.from_numpy(record["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(record["attention_mask"]),
        "loss_mask": torch.from_numpy(record["loss_mask"]),
        "segment_ids": torch.from_numpy(record["segment_ids"].astype(np.int64)),
        "sample_ids": torch.from_numpy(np.array(ids, dtype=np.int64)),
        "entropy": torch.from_numpy(record["entropy"].astype(np.float32)),
        "true_logprob": torch.from_numpy(record["true_logprob"].astype(np.float32)),
    }
    return batch | collate_targets(record, targets)
