"""Store size and fidelity: bytes per token of every record, and how far each record is from the teacher's full
distribution, measured in one run on real text.

Builds a store (`build_cache`, the real codecs) with top-K + tail (K = the largest --k) and sampled targets over
the given text, then runs the same loaded teacher again over the store's samples and computes its full
log-softmax a chunk of positions at a time (never [batch, time, vocab]). Against it, at every trained position:

Top-k + tail, for each k. The largest k is the store's own record; a smaller k is extracted by the build's own code
(`teacher_cache.targets.extract_targets`) and rounded as the store rounds, so it is what a store with that k holds.
  - kept mass a = the teacher's probability of the k ids (1 - tail mass m): mean and p10 / p50 / p90.
  - renormalised top-k (no tail), q~ = the stored probabilities scaled to sum to 1 over the k ids. KL(p || q~) is
    infinite wherever m > 0 (every position of a real teacher): reported is the share of such positions and the
    finite reverse KL(q~ || p), about -log a, by how much renormalising inflates every kept log-prob.
  - top-k + tail, q^ = the stored record normalised: exp(stored log-prob) on each of the k ids, exp(stored tail)
    on one more bucket (the rounding leaves their sum within 0.8% of 1).
      bucket KL      = KL(p coarsened to the k+1 buckets || q^): all of p that a ghost-bucket loss sees, so it is
                       the rounding's cost alone (0 for exact values), and a lower bound on KL(p || q) for every
                       full distribution q that agrees with q^ on the buckets;
      tail-shape KL  = m KL(p_tail / m || uniform over the other V - k ids): what the record cannot say about how
                       the tail is spread, when a full distribution must be named without a student;
      uniform-tail KL = KL(p || q^ with its tail bucket spread uniformly over the V - k other ids)
                      = bucket KL + tail-shape KL (chain rule of KL).
  - rounding: max |stored - exact| over the store's top-K log-probs and tails (format 2 promises <= 1/128 nat, up to
    the float noise of recomputing the same logits, which the entropy and true-token log-prob columns show).

Sampled targets (N draws, counts c). c/N is unbiased for p but zero on undrawn ids, so KL(p || c/N) is infinite
as well, and a finite KL would measure the smoothing one chose. What a student trains on is the estimate's
expectation and noise (the forward-KL gradient on the student's logits is q - c/N), so reported are:
  - unique ids per token, and the teacher mass they cover (compare with top-k's kept mass);
  - gradient noise: ||c/N - p||^2 per position, realised, against its multinomial expectation (1 - sum p^2) / N;
  - loss noise: at the teacher itself the sampled KD loss sum (c/N)(-log p) estimates H(p); its mean error
    (the bias, 0 within its standard error for an unbiased record) and RMS per token, against sqrt(Var_p[log p] / N).

Bytes per trained token come from the store's manifest (`array_bytes`); the top-k of a smaller k is re-encoded
with the store's codecs; alternative codecs from `benchmarks/codec_bytes.py`; baselines from the same records:
17-bit ids + bf16 (k * 33 / 8 B/token), 15-bit ids + fp16 (k * 31 / 8), RS-KD's 3 bytes per sampled entry.

    python benchmarks/store_fidelity.py --teacher .demo/teacher --dataset .demo/teacher/corpus/heldout.jsonl \\
        [--samples 64 --seq-len 512] [--k 8,16,32,64,128] [--draws 50] [--json out.json]

Legend: P trained positions, p positions of a chunk, V vocabulary, K top-k entries, H hidden size,
E sampled entries (e of a chunk).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import torch
import zarr
from zarr.storage import MemoryStore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.codec_bytes import measure as store_codec_variants  # noqa: E402
from benchmarks.codec_bytes import measure_arrays as codec_variants  # noqa: E402
from benchmarks.machine_info import machine  # noqa: E402
from storage.layout import (  # noqa: E402
    LOGPROB_FLOOR,
    LOGPROB_SCALE,
    quantize_logprobs,
)
from storage.reader import Store  # noqa: E402
from storage.targets import array_specs  # noqa: E402
from storage.targets.sampled import MULTINOMIAL  # noqa: E402
from storage.targets.topk import logical_sizes  # noqa: E402
from storage.writer import quantized_record, write_arrays  # noqa: E402
from teacher_cache.build import build_cache  # noqa: E402
from teacher_cache.config import BuildConfig  # noqa: E402
from teacher_cache.targets import TargetSpec, extract_targets  # noqa: E402
from teacher_cache.teacher import TransformersTeacher  # noqa: E402

ROUNDING_BOUND = 1 / (2 * LOGPROB_SCALE)  # 1/128 nat
RECOMPUTE_SLACK = 1e-4  # fp32 noise between the build's logits and the recomputed ones, allowed on top of the bound
SAMPLED_TARGET = 1.5  # bytes per stored (id, count) entry; RS-KD's layout spends 3
TOPK_TARGET = (64, 90.0)  # top-64 + tail, bytes per token
ANALYSIS_CHUNK_BYTES = 64 << 20  # float64 [p, V] per chunk of the full distribution
TOPK_ARRAYS = ("topk_ids", "topk_logprobs", "tail_logmass")
RECORDS = {  # the store's arrays, grouped by record
    "inputs": ("input_ids", "attention_mask", "loss_mask", "segment_ids"),
    "entropy + true_logprob": ("entropy", "true_logprob"),
    "top-k + tail": TOPK_ARRAYS,
    "sampled": ("sampled_ids", "sampled_counts", "sampled_nunique", "sampled_offsets"),
}


def topk_fidelity(logp_pV: torch.Tensor, ids_pK: torch.Tensor, stored_pK: torch.Tensor,
                  stored_tail_p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position fidelity of top-k + tail records (ids in any order, their stored log-probs and tail) against
    the exact log-probs `logp_pV` (float64); the definitions are in the module docstring."""
    V, K = logp_pV.shape[1], ids_pK.shape[1]
    head_logp_pK = logp_pV.gather(1, ids_pK)
    head_p_pK = head_logp_pK.exp()
    tail_logp_pV = logp_pV.scatter(1, ids_pK, float("-inf"))
    log_m_p = tail_logp_pV.logsumexp(1)  # in log space, as the build sums it: exact for tiny tails
    m_p = log_m_p.exp()
    tail_plogp_p = torch.where(tail_logp_pV > float("-inf"), tail_logp_pV.exp() * tail_logp_pV, 0.0).sum(1)
    stored_pK, stored_tail_p = stored_pK.double(), stored_tail_p.double()
    log_z_p = torch.cat([stored_pK, stored_tail_p[:, None]], 1).logsumexp(1)  # normaliser of the stored record
    has_tail_p = m_p > 0  # guards 0 * log 0
    bucket_p = (head_p_pK * (head_logp_pK - stored_pK + log_z_p[:, None])).sum(1) + torch.where(
        has_tail_p, m_p * (log_m_p - stored_tail_p + log_z_p), 0.0)
    tail_shape_p = torch.where(has_tail_p, tail_plogp_p - m_p * log_m_p + m_p * math.log(max(V - K, 1)), 0.0)
    renorm_logq_pK = stored_pK.log_softmax(1)
    return {
        "kept_mass": head_p_pK.sum(1),
        "has_tail": has_tail_p.double(),
        "renorm_reverse_kl": (renorm_logq_pK.exp() * (renorm_logq_pK - head_logp_pK)).sum(1),
        "bucket_kl": bucket_p,
        "tail_shape_kl": tail_shape_p,
        "uniform_tail_kl": bucket_p + tail_shape_p,
        "logprob_error": (stored_pK - head_logp_pK.clamp(min=LOGPROB_FLOOR)).abs().amax(1),
        "tail_error": (stored_tail_p - log_m_p.clamp(min=LOGPROB_FLOOR)).abs(),
    }


def sampled_fidelity(logp_pV: torch.Tensor, nunique_p: torch.Tensor, ids_e: torch.Tensor, counts_e: torch.Tensor,
                     num_draws: int) -> dict[str, torch.Tensor]:
    """Per-position coverage and noise of sampled records (distinct ids and counts, position-major) against the
    exact log-probs `logp_pV` (float64); the definitions are in the module docstring."""
    p_pV = logp_pV.exp()
    position_e = torch.repeat_interleave(torch.arange(len(p_pV), device=p_pV.device), nunique_p)
    f_e = counts_e.double() / num_draws
    logp_e = logp_pV[position_e, ids_e]
    p_e = logp_e.exp()

    def per_position(values_e: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(p_pV), dtype=torch.float64, device=p_pV.device).index_add_(0, position_e, values_e)

    plogp_pV = torch.where(p_pV > 0, p_pV * logp_pV, 0.0)
    entropy_p = -plogp_pV.sum(1)
    sum_p2_p = (p_pV * p_pV).sum(1)
    return {
        "covered_mass": per_position(p_e),
        "l2": sum_p2_p - 2 * per_position(f_e * p_e) + per_position(f_e * f_e),  # ||c/N - p||^2, expanded
        "expected_l2": (1 - sum_p2_p) / num_draws,
        "loss_error": per_position(-f_e * logp_e) - entropy_p,
        "expected_loss_var": ((plogp_pV * logp_pV).sum(1) - entropy_p**2) / num_draws,  # Var_p[log p] / N
    }


def trained_records(store: Store) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(every array of every row, the per-position records of the trained positions in order [P, ...])."""
    data = store.read_rows(0, len(store))
    mask = data["loss_mask"]
    names = ("entropy", "true_logprob", "topk_ids", "topk_logprobs", "tail_logmass", "sampled_nunique")
    trained = {name: data[name][mask] for name in names}
    trained["true_ids"] = data["input_ids"][:, 1:][mask]
    trained["entry_starts"] = np.concatenate([[0], np.cumsum(trained["sampled_nunique"], dtype=np.int64)])
    assert trained["entry_starts"][-1] == len(data["sampled_ids"])
    return data, trained


def hidden_chunks(teacher: TransformersTeacher, data: dict[str, np.ndarray], batch_size: int,
                  chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first trained position, final hidden states [p, H]) over the store's trained positions, in order."""
    first = 0
    for start in range(0, len(data["input_ids"]), batch_size):
        rows = slice(start, start + batch_size)
        ids = torch.from_numpy(data["input_ids"][rows, :-1].astype(np.int64)).to(teacher.device)
        attention = torch.from_numpy(data["attention_mask"][rows, :-1]).long().to(teacher.device)
        trained = torch.from_numpy(data["loss_mask"][rows]).flatten().to(teacher.device)
        out = teacher.model.base_model(input_ids=ids, attention_mask=attention, use_cache=False)
        hidden_PH = out.last_hidden_state.flatten(0, 1)[trained]
        for offset in range(0, len(hidden_PH), chunk):
            yield first + offset, hidden_PH[offset:offset + chunk]
        first += len(hidden_PH)


def chunk_records(trained: dict[str, np.ndarray], data: dict[str, np.ndarray], at: slice,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The stored records of the trained positions `at` (and their sampled entries), as tensors on `device`."""
    names = ("topk_ids", "topk_logprobs", "tail_logmass", "sampled_nunique", "true_ids", "entropy", "true_logprob")
    out = {name: torch.from_numpy(trained[name][at]) for name in names}
    entries = slice(*trained["entry_starts"][[at.start, at.stop]])
    out |= {"sampled_ids": torch.from_numpy(data["sampled_ids"][entries]),
            "sampled_counts": torch.from_numpy(data["sampled_counts"][entries])}
    return {name: (value.float() if value.is_floating_point() else value.long()).to(device)
            for name, value in out.items()}


def as_stored(logp: torch.Tensor) -> torch.Tensor:
    """Log-probs as a store holds them (`storage.layout.quantize_logprobs`), on their device."""
    return torch.from_numpy(quantize_logprobs(logp.cpu().numpy())).to(logp.device)


def store_checks(logp_pV: torch.Tensor, rec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per position: do the stored top-k ids equal the recomputed ones, and how far apart are the stored and
    recomputed entropy and true-token log-prob (the float noise between the build's logits and these)."""
    exact_ids = logp_pV.topk(rec["topk_ids"].shape[1], -1).indices.sort(-1).values
    return {
        "ids_match": (exact_ids == rec["topk_ids"]).all(1),
        "entropy_diff": (-(logp_pV.exp() * logp_pV).sum(-1) - rec["entropy"]).abs(),
        "true_logprob_diff": (logp_pV.gather(1, rec["true_ids"][:, None]).squeeze(1) - rec["true_logprob"]).abs(),
    }


@torch.inference_mode()
def analyse(teacher: TransformersTeacher, data: dict[str, np.ndarray], trained: dict[str, np.ndarray],
            ks: tuple[int, ...], num_draws: int, batch_size: int, chunk: int) -> tuple[dict, dict]:
    """Per-position metrics (name -> [P] array; top-k ones named `name@k`) and the derived top-k records of the
    smaller k (k -> ids, logprobs, tail)."""
    metrics: dict[str, list[np.ndarray]] = {}
    derived: dict[int, dict[str, list[np.ndarray]]] = {k: {} for k in ks[:-1]}

    def keep(into: dict, values: dict, suffix: str = "") -> None:
        for name, value in values.items():
            into.setdefault(name + suffix, []).append(value.cpu().numpy())

    for first, hidden_pH in hidden_chunks(teacher, data, batch_size, chunk):
        # Normalised in float64: the KLs below are differences of log-probs, some of order 1e-6 nats, which an
        # fp32 normaliser (off by ~1e-7 relative) would bias.
        logp_pV = torch.log_softmax(teacher.logits(hidden_pH).double(), -1)
        rec = chunk_records(trained, data, slice(first, first + len(hidden_pH)), logp_pV.device)
        keep(metrics, topk_fidelity(logp_pV, rec["topk_ids"], rec["topk_logprobs"], rec["tail_logmass"]), f"@{ks[-1]}")
        keep(metrics, sampled_fidelity(logp_pV, rec["sampled_nunique"], rec["sampled_ids"], rec["sampled_counts"],
                                       num_draws) | store_checks(logp_pV, rec))
        for k in ks[:-1]:
            record = extract_targets(hidden_pH, rec["true_ids"], teacher.logits,
                                     TargetSpec(top_k=k, num_draws=None, chunk_positions=len(hidden_pH)))
            stored = {"ids": record["topk_ids"], "logprobs": as_stored(record["topk_logprobs"]),
                      "tail": as_stored(record["tail_logmass"])}
            keep(derived[k], stored)
            keep(metrics, topk_fidelity(logp_pV, stored["ids"], stored["logprobs"], stored["tail"]), f"@{k}")
    return ({name: np.concatenate(parts) for name, parts in metrics.items()},
            {k: {name: np.concatenate(parts) for name, parts in record.items()} for k, record in derived.items()})


def dense_topk(mask_SL: np.ndarray, vocab_size: int, ids_PK: np.ndarray, logprobs_PK: np.ndarray,
               tail_P: np.ndarray) -> dict[str, np.ndarray]:
    """A top-k record of the trained positions as a shard holds it: [S, L, ...] arrays, zero elsewhere."""
    specs = array_specs(vocab_size=vocab_size, targets={"topk": {"k": ids_PK.shape[1]}})
    out = {"loss_mask": mask_SL}
    for name, values in zip(TOPK_ARRAYS, (ids_PK, logprobs_PK, tail_P), strict=True):
        dtype = specs[name].dtype if name in specs else np.float32  # version 3 stores log-probs in two arrays
        out[name] = np.zeros(mask_SL.shape + values.shape[1:], dtype)
        out[name][mask_SL] = values
    return out


def topk_bytes(dense: dict[str, np.ndarray], vocab_size: int) -> dict[str, float]:
    """Bytes per trained token of a top-k record (`dense_topk`) as the store's writer encodes it: its codecs,
    chunks and metadata."""
    specs = array_specs(vocab_size=vocab_size, targets={"topk": {"k": dense["topk_ids"].shape[-1]}})
    specs = {name: spec for name, spec in specs.items() if name in TOPK_ARRAYS or name.startswith("topk_")}
    tokens = int(dense["loss_mask"].sum())
    group = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    stored = logical_sizes(write_arrays(group, specs, quantized_record({name: dense[name] for name in TOPK_ARRAYS},
                                                                       specs)))
    out = {name: stored[name] / tokens for name in TOPK_ARRAYS}
    return out | {"total": sum(out.values())}


def baselines(k: int, vocab_size: int) -> dict[str, float]:
    """Plain layouts others use for k entries per token, in bytes per token (no tail)."""
    bits = math.ceil(math.log2(vocab_size))
    return {"17-bit ids + bf16": k * (17 + 16) / 8, "15-bit ids + fp16": k * (15 + 16) / 8,
            f"{bits}-bit ids + fp16 (this vocab)": k * (bits + 16) / 8}


def summary(values: np.ndarray) -> dict[str, float]:
    p10, p50, p90 = np.percentile(values, (10, 50, 90))
    return {"mean": float(values.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def topk_rows(metrics: dict, derived: dict, data: dict, store: Store, ks: tuple[int, ...],
              store_codecs: dict) -> list[dict]:
    """Per k: kept mass, the KLs, bytes per token (the store's own for the largest k), the bytes under alternative
    codecs, and the baselines."""
    vocab = store.manifest.teacher["vocab_size"]
    stored = store.bytes_per_token()
    rows = []
    for k in ks:
        m = {name.split("@")[0]: values for name, values in metrics.items() if name.endswith(f"@{k}")}
        if k == ks[-1]:
            nbytes = {name: stored[name] for name in TOPK_ARRAYS}
            nbytes["total"] = sum(nbytes.values())
            codecs = {record: v for record, v in store_codecs.items() if record.startswith(("topk_", "tail_"))}
        else:
            dense = dense_topk(data["loss_mask"], vocab, derived[k]["ids"], derived[k]["logprobs"],
                               derived[k]["tail"])
            nbytes, codecs = topk_bytes(dense, vocab), codec_variants(dense, vocab)
        rows.append({
            "k": k, "record": "store" if k == ks[-1] else "derived, re-encoded",
            "kept_mass": summary(m["kept_mass"]), "tail_positive_share": float(m["has_tail"].mean()),
            **{name: float(m[name].mean()) for name in ("renorm_reverse_kl", "bucket_kl", "tail_shape_kl",
                                                         "uniform_tail_kl")},
            "bytes_per_token": nbytes, "codecs": codecs, "baselines": baselines(k, vocab),
        })
    return rows


def rounding_check(metrics: dict, data: dict, store: Store, k: int) -> dict:
    """The store's own top-k against the recomputed distribution, and re-encoding it against the manifest."""
    re_encoded = topk_bytes({name: data[name] for name in ("loss_mask", *TOPK_ARRAYS)},
                            store.manifest.teacher["vocab_size"])
    logprob_error = float(metrics[f"logprob_error@{k}"].max())
    tail_error = float(metrics[f"tail_error@{k}"].max())
    return {
        "k": k, "bound": ROUNDING_BOUND, "max_logprob_error": logprob_error, "max_tail_error": tail_error,
        "within_bound": max(logprob_error, tail_error) <= ROUNDING_BOUND + RECOMPUTE_SLACK,
        "ids_match_share": float(metrics["ids_match"].mean()),
        "max_entropy_diff": float(metrics["entropy_diff"].max()),
        "max_true_logprob_diff": float(metrics["true_logprob_diff"].max()),
        "re_encoded_topk_bytes_per_token": re_encoded["total"],
    }


def sampled_row(metrics: dict, trained: dict, store: Store, num_draws: int) -> dict:
    """Unique ids, coverage, noise and bytes of the sampled record, with RS-KD's 3 bytes per entry."""
    tokens = len(trained["sampled_nunique"])
    entries = int(trained["entry_starts"][-1])
    stored = store.bytes_per_token()
    id_count = (stored["sampled_ids"] + stored["sampled_counts"]) * tokens / entries
    record = sum(stored[name] for name in RECORDS["sampled"])
    loss_error = metrics["loss_error"]
    return {
        "draws": num_draws, "entries_per_token": entries / tokens,
        "unique_ids": summary(trained["sampled_nunique"].astype(np.float64)),
        "covered_mass": summary(metrics["covered_mass"]),
        "l2": float(metrics["l2"].mean()), "expected_l2": float(metrics["expected_l2"].mean()),
        "loss_bias": float(loss_error.mean()), "loss_bias_se": float(loss_error.std() / math.sqrt(tokens)),
        "loss_rms": float(np.sqrt((loss_error**2).mean())),
        "expected_loss_rms": float(np.sqrt(metrics["expected_loss_var"].mean())),
        "bytes_per_token": {name: stored[name] for name in RECORDS["sampled"]} | {"total": record},
        "bytes_per_entry": {"ids + counts": id_count, "whole record": record * tokens / entries,
                            "baseline: RS-KD": 3.0},
        "rs_kd_bytes_per_token": 3.0 * entries / tokens,
    }


def verdicts(topk: list[dict], sampled: dict, rounding: dict) -> list[dict]:
    k, target = TOPK_TARGET
    out = [{"target": f"sampled record <= {SAMPLED_TARGET} B per (id, count) entry (nunique and offsets included)",
            "value": sampled["bytes_per_entry"]["whole record"],
            "met": sampled["bytes_per_entry"]["whole record"] <= SAMPLED_TARGET}]
    row = next((r for r in topk if r["k"] == k), None)
    if row is not None:
        total = row["bytes_per_token"]["total"]
        out.append({"target": f"top-{k} + tail <= {target:g} B/token (ids + log-probs + tail)", "value": total,
                    "met": total <= target})
    out.append({"target": "every stored log-prob and tail within 1/128 nat of the teacher's",
                "value": max(rounding["max_logprob_error"], rounding["max_tail_error"]),
                "met": rounding["within_bound"]})
    return out


def measure_fidelity(*, teacher: str, dataset: str, store_dir: str, samples: int, seq_len: int,
                     ks: tuple[int, ...], num_draws: int, text_field: str = "text", batch_size: int = 8,
                     device: str = "cpu", dtype: str = "float32", chunk_positions: int | None = None) -> dict:
    """Build a store into `store_dir` and measure its bytes and fidelity against the teacher; see the module doc."""
    ks = tuple(sorted(set(ks)))
    load_before = os.getloadavg()[0]
    model = TransformersTeacher(teacher, device=device, dtype=dtype)
    if ks[-1] > model.vocab_size:
        raise ValueError(f"--k {ks[-1]}: larger than the teacher's vocabulary of {model.vocab_size} ids.")
    began = time.perf_counter()
    build_cache(BuildConfig(model=teacher, dataset=dataset, output=store_dir, text_field=text_field,
                            max_samples=samples, seq_len=seq_len, top_k=ks[-1], num_draws=num_draws,
                            batch_size=batch_size, device=device, dtype=dtype,
                            # Independent draws: `expected_l2` is their noise, (1 - sum p^2) / N.
                            draw_scheme=MULTINOMIAL), teacher=model)
    built = time.perf_counter()
    store = Store(store_dir)
    data, trained = trained_records(store)
    chunk = chunk_positions or max(1, ANALYSIS_CHUNK_BYTES // (8 * model.vocab_size))
    metrics, derived = analyse(model, data, trained, ks, num_draws, batch_size, chunk)
    codecs = store_codec_variants(store, len(store.shards))["rows"]
    topk = topk_rows(metrics, derived, data, store, ks, codecs)
    rounding = rounding_check(metrics, data, store, ks[-1])
    sampled = sampled_row(metrics, trained, store, num_draws)
    teacher_info = store.manifest.teacher
    return {
        "machine": machine(model.device) | {"load_average": [load_before, os.getloadavg()[0]]},
        "teacher": {"model": teacher_info["model"], "architecture": teacher_info["architecture"],
                    "vocab_size": teacher_info["vocab_size"], "dtype": teacher_info["dtype"],
                    "parameters": model.model.num_parameters(),
                    "mean_entropy": float(trained["entropy"].mean()),
                    "mean_nll": float(-trained["true_logprob"].mean())},
        "data": {"dataset": dataset, "samples": len(store), "seq_len": seq_len, "trained_tokens": len(metrics["l2"])},
        "seconds": {"build": built - began, "analysis": time.perf_counter() - built},
        "store_bytes_per_token": store.bytes_per_token(),
        "topk": topk, "rounding": rounding, "sampled": sampled,
        "codecs": {record: v for record, v in codecs.items() if not record.startswith(("topk_", "tail_"))},
        "verdicts": verdicts(topk, sampled, rounding),
    }


def markdown(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|:---|" + "|".join("---:" for _ in headers[1:]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def print_report(r: dict) -> None:
    m, t, d = r["machine"], r["teacher"], r["data"]
    click.echo(f"machine: {m['cpu']} ({m['cpu_cores']} cores), GPU {m['gpu']}, torch {m['torch']}; 1-min load "
               "average {:.2f} at the start, {:.2f} at the end".format(*m["load_average"]))
    click.echo(f"teacher: {t['model']} ({t['architecture']}, {t['parameters']:,} parameters, vocab "
               f"{t['vocab_size']}, {t['dtype']}); mean entropy {t['mean_entropy']:.3f} nats, NLL {t['mean_nll']:.3f}")
    click.echo(f"data: {d['dataset']}, {d['samples']} samples x {d['seq_len']} = {d['trained_tokens']} trained "
               f"tokens; build {r['seconds']['build']:.1f}s, analysis {r['seconds']['analysis']:.1f}s\n")
    stored = r["store_bytes_per_token"]
    click.echo("Store bytes per trained token (manifest `array_bytes`)\n")
    rows = [[group, name, f"{stored[name]:.2f}"] for group, names in RECORDS.items() for name in names]
    rows += [["stats", name, f"{value:.3f}"] for name, value in stored.items() if name.startswith("stats_")]
    click.echo(markdown(["record", "array", "B/token"], rows + [["", "total", f"{stored['total']:.2f}"]]) + "\n")
    print_topk(r["topk"])
    print_rounding(r["rounding"])
    print_sampled(r["sampled"])
    click.echo("Alternative codecs for the other records (`benchmarks/codec_bytes.py`), B/token\n")
    rows = [[record, variant, f"{value:.2f}"] for record, variants in r["codecs"].items()
            if record != "sampled entries per token"
            for variant, value in sorted(variants.items(), key=lambda kv: kv[1])]
    click.echo(markdown(["record", "codec", "B/token"], rows) + "\n")
    click.echo(markdown(["target", "measured", "met"], [
        [v["target"], f"{v['value']:.4g}", "yes" if v["met"] else "NO"] for v in r["verdicts"]]))


def print_topk(rows: list[dict]) -> None:
    click.echo("Top-k + tail: kept mass and KL to the full distribution (nats/token; definitions in the module doc)\n")
    click.echo(markdown(
        ["k", "record", "kept mean", "p10", "p50", "p90", "renorm KL(p\\|\\|q~)", "KL(q~\\|\\|p)", "bucket KL",
         "tail-shape KL", "uniform-tail KL"],
        [[r["k"], r["record"], *(f"{r['kept_mass'][q]:.3f}" for q in ("mean", "p10", "p50", "p90")),
          f"inf at {r['tail_positive_share']:.0%}", f"{r['renorm_reverse_kl']:.3f}", f"{r['bucket_kl']:.2e}",
          f"{r['tail_shape_kl']:.3f}", f"{r['uniform_tail_kl']:.3f}"] for r in rows]) + "\n")
    names = list(rows[0]["baselines"])
    click.echo("Top-k + tail: bytes per trained token, against plain layouts of the same k (no tail)\n")
    click.echo(markdown(
        ["k", "ids", "log-probs", "tail", "total", *names, "vs 15-bit + fp16"],
        [[r["k"], *(f"{r['bytes_per_token'][n]:.2f}" for n in ("topk_ids", "topk_logprobs", "tail_logmass", "total")),
          *(f"{r['baselines'][n]:.1f}" for n in names),
          f"{r['bytes_per_token']['total'] / r['baselines']['15-bit ids + fp16']:.2f}x"] for r in rows]) + "\n")
    click.echo("Top-k + tail under alternative codecs (`benchmarks/codec_bytes.py`), B/token\n")
    variants = {(record, variant): None for r in rows for record, by in r["codecs"].items() for variant in by}
    click.echo(markdown(["record", "codec", *(f"k={r['k']}" for r in rows)], [
        [record, variant, *(f"{r['codecs'].get(record, {}).get(variant, float('nan')):.2f}" for r in rows)]
        for record, variant in variants]) + "\n")


def print_rounding(r: dict) -> None:
    click.echo(f"Stored top-{r['k']} against the recomputed teacher (bound {r['bound']:.6f} nat)\n")
    click.echo(markdown(["max abs error log-prob", "max abs error tail", "within bound", "top-k ids equal",
                         "max abs diff entropy", "max abs diff true log-prob", "re-encoded top-k B/token"],
                        [[f"{r['max_logprob_error']:.6f}", f"{r['max_tail_error']:.6f}",
                          "yes" if r["within_bound"] else "NO", f"{r['ids_match_share']:.2%}",
                          f"{r['max_entropy_diff']:.1e}", f"{r['max_true_logprob_diff']:.1e}",
                          f"{r['re_encoded_topk_bytes_per_token']:.2f}"]]) + "\n")


def print_sampled(s: dict) -> None:
    u, c, per_entry = s["unique_ids"], s["covered_mass"], s["bytes_per_entry"]
    click.echo(f"Sampled targets, N = {s['draws']} draws\n")
    click.echo(markdown(
        ["unique ids mean", "p10 / p50 / p90", "covered mass mean", "p10 / p50 / p90", "\\|\\|c/N-p\\|\\|^2",
         "expected", "loss bias (+- SE)", "loss RMS", "expected RMS"],
        [[f"{u['mean']:.2f}", f"{u['p10']:.0f} / {u['p50']:.0f} / {u['p90']:.0f}", f"{c['mean']:.3f}",
          f"{c['p10']:.3f} / {c['p50']:.3f} / {c['p90']:.3f}", f"{s['l2']:.4f}", f"{s['expected_l2']:.4f}",
          f"{s['loss_bias']:+.4f} (+- {s['loss_bias_se']:.4f})", f"{s['loss_rms']:.3f}",
          f"{s['expected_loss_rms']:.3f}"]]) + "\n")
    b = s["bytes_per_token"]
    click.echo(markdown(
        ["ids", "counts", "nunique", "offsets", "total B/token", "RS-KD B/token", "B/entry ids + counts",
         "B/entry whole record", "RS-KD B/entry"],
        [[*(f"{b[n]:.2f}" for n in RECORDS["sampled"]), f"{b['total']:.2f}", f"{s['rs_kd_bytes_per_token']:.2f}",
          f"{per_entry['ids + counts']:.3f}", f"{per_entry['whole record']:.3f}", "3"]]) + "\n")


def parse_ks(ctx, param, text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 8,16,64, got {text!r}.") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"expected positive sizes such as 8,16,64, got {text!r}.")
    return ks


@click.command()
@click.option("--teacher", required=True, help="Teacher model directory (with its tokenizer).")
@click.option("--dataset", required=True, help="Held-out text (any file `teacher-cache build --dataset` takes).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--samples", type=int, default=64, show_default=True, help="Store rows.")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--k", "ks", default="8,16,32,64,128", show_default=True, callback=parse_ks,
              help="Top-k sizes, comma-separated; the store holds the largest.")
@click.option("--draws", type=int, default=50, show_default=True, help="Sampled draws per position (N).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="Teacher weights dtype.")
@click.option("--chunk-positions", type=int, help="Positions of the full distribution held at once.")
@click.option("--store", "store_dir", help="Keep the store built here (default: a temporary directory).")
@click.option("--json", "json_path", help="Also write every figure to this JSON file.")
def main(teacher: str, dataset: str, text_field: str, samples: int, seq_len: int, ks: tuple[int, ...], draws: int,
         batch_size: int, device: str, dtype: str, chunk_positions: int | None, store_dir: str | None,
         json_path: str | None) -> None:
    """Bytes per token and fidelity of every record of a store built from TEACHER over DATASET."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            result = measure_fidelity(teacher=teacher, dataset=dataset, store_dir=store_dir or f"{scratch}/store",
                                      samples=samples, seq_len=seq_len, ks=ks, num_draws=draws, text_field=text_field,
                                      batch_size=batch_size, device=device, dtype=dtype,
                                      chunk_positions=chunk_positions)
        except ValueError as exc:  # a bad option, named by the build's checks or ours
            raise click.UsageError(str(exc)) from None
    print_report(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
