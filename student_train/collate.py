"""Collation: the rows a loader read from the store, as the torch batch the loss reads.

Sits between the shard reads (`student_train.shard_cache`) and the loss (`student_train.losses`): `collate` turns
one batch's numpy rows into int64 ids, float32 targets and [B, L, M] sampled draws padded to the batch's widest
position, and maps the store's tail-bucket id of sampled draws to TAIL_BUCKET, the id the loss expects. The
batch's records and this id are the contract between the loader and the loss; both import them from here.

Legend: B samples in a batch, L positions per sample (`seq_len`), M sampled ids per position (padded to the batch's
maximum), E flat sampled entries, P = B*L positions.
"""

from __future__ import annotations

import numpy as np
import torch

Batch = dict[str, torch.Tensor]
# Id of the tail bucket in collated sampled targets (draws the vllm backend makes from top-k + one tail bucket).
TAIL_BUCKET = -1


def tail_bucket(targets: dict) -> int | None:
    """The store id of the sampled draws' tail bucket (see the manifest's targets.sampled), or None."""
    return targets.get("sampled", {}).get("tail_bucket_id")


def pad_sampled(ids_E: np.ndarray, counts_E: np.ndarray, nunique_BL: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat sampled entries -> [B, L, M] ids (int64) and counts (float32); padding is id 0 with count 0."""
    n_P = nunique_BL.reshape(-1).astype(np.int64)
    start_P = np.cumsum(n_P) - n_P
    m = int(n_P.max()) if len(n_P) else 0
    col_M = np.arange(m)
    valid_PM = col_M < n_P[:, None]
    index_PM = np.where(valid_PM, start_P[:, None] + col_M, 0)
    ids_PM = np.where(valid_PM, ids_E[index_PM], 0).astype(np.int64)
    counts_PM = np.where(valid_PM, counts_E[index_PM], 0).astype(np.float32)
    shape = (*nunique_BL.shape, m)
    return ids_PM.reshape(shape), counts_PM.reshape(shape)


def collate(record: dict[str, np.ndarray], ids: np.ndarray, tail_bucket_id: int | None = None) -> Batch:
    """Torch batch of the rows `record` (from `ShardCache.rows`) of the global samples `ids`.

    `tail_bucket_id` is the store's id for the tail bucket of sampled draws (None when draws are from the full
    distribution); it becomes TAIL_BUCKET.
    """
    batch = {
        "input_ids": torch.from_numpy(record["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(record["attention_mask"]),
        "loss_mask": torch.from_numpy(record["loss_mask"]),
        "segment_ids": torch.from_numpy(record["segment_ids"].astype(np.int64)),
        "sample_ids": torch.from_numpy(np.array(ids, dtype=np.int64)),
    }
    floats = ["entropy", "true_logprob", "topk_logprobs", "tail_logmass"]
    floats += [name for name in record if name.startswith("hidden_states_")]
    batch.update({name: torch.from_numpy(record[name].astype(np.float32)) for name in floats if name in record})
    if "topk_ids" in record:
        batch["topk_ids"] = torch.from_numpy(record["topk_ids"].astype(np.int64))
    if "sampled_nunique" in record:
        ids_BLM, counts_BLM = pad_sampled(record["sampled_ids"], record["sampled_counts"], record["sampled_nunique"])
        if tail_bucket_id is not None:
            ids_BLM[ids_BLM == tail_bucket_id] = TAIL_BUCKET
        batch["sampled_ids"], batch["sampled_counts"] = torch.from_numpy(ids_BLM), torch.from_numpy(counts_BLM)
    return batch
