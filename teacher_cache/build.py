"""`build_cache`: dataset -> samples -> teacher -> targets -> background shard writer -> manifest.

Batches never cross a shard boundary and the draws of a batch come from a generator seeded by (seed, first
sample of the batch), so the content of every shard is a pure function of the options: a resumed build
writes exactly what an uninterrupted one would have, and so do several workers that share a build. Each
worker tokenizes the whole stream (cheap next to the teacher) but runs the teacher only on its own shards
(`storage/workers.py`); the last one to finish merges the store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
from tqdm.auto import tqdm

from storage.causal_lm import TORCH_DTYPES
from storage.conversations import ChatEncoder, encoder_for
from storage.fs import Location
from storage.lock import OutputLock, lock_name
from storage.manifest import Manifest, ShardInfo
from storage.rollouts import RolloutEncoder, rollout_encoder
from storage.samples import Rows, iter_rows, source_id
from storage.targets import KINDS, rollout
from storage.workers import WorkerSlot, merge_if_finished
from storage.writer import BackgroundWriter, StoreWriter
from teacher_cache.backend import TeacherBackend
from teacher_cache.backend_registry import load_teacher
from teacher_cache.config import BuildConfig
from teacher_cache.source import Source, read_source, report_conversations
from teacher_cache.targets import NonFiniteLogits, TargetSpec, hidden, wanted_extractors
from teacher_cache.teacher import check_context_length

log = logging.getLogger(__name__)

# fp32 logits materialised at once. On CPU, large blocks are mapped and unmapped by the allocator at every chunk
# (measured: 23% slower builds at 256 MiB than at 32 MiB); GPUs want big chunks for kernel efficiency.
LOGIT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
# fp32 logits extracted at once within a chunk, on CPU, where a block stays in cache between the top-k, the pass
# over the vocabulary and the draws. Measured on 2 cores (top-64 + 50 draws): 16 MiB blocks 17% faster than whole
# 32 MiB chunks at 32k ids, 9% at 49k; 2-4 MiB blocks slower than either (per-op overhead). GPUs extract whole chunks.
EXTRACT_BLOCK_BYTES = {"cpu": 16 << 20}


def build_cache(config: BuildConfig, *, teacher: TeacherBackend | None = None) -> Manifest:
    """Run the teacher over the dataset and write its targets to `config.output`.

    Args:
        config: the build's options.
        teacher: an already loaded backend (loaded from `config.model` when None).

    Returns:
        The completed store's manifest. A worker of several (`config.num_workers` > 1) returns its own manifest
        (with a `worker` entry) unless it finished last and merged the store.

    Raises:
        LockError: another build writes to `config.output` (a worker: another process runs the same worker).
        NonFiniteLogits: the teacher gave no distribution (NaN or infinite logits) at a position; the shards
            committed before its batch stay.
    """
    output = Location(config.output)
    if output.local and output.root.exists() and not output.root.is_dir():
        raise ValueError(f"--output {config.output} is an existing file; give a directory for the store.")
    worker = _worker(config)
    # Locked before the output is checked, so no other build can start writing between the check and this one.
    with OutputLock(output, lock_name(None if worker is None else worker.index)):
        StoreWriter.check_output(output, resume=config.resume, worker=worker)
        source = read_source(config)
        check_context_length(config.model, config.seq_len, allow_long=config.allow_long_context)
        owned = teacher is None
        teacher = teacher or load_teacher(config)
        try:
            return _build(config, output, source, teacher)
        finally:
            if owned:
                teacher.close()


def _build(config: BuildConfig, output: Location, source: Source, teacher: TeacherBackend) -> Manifest:
    if config.stores_topk and config.top_k > teacher.vocab_size:
        raise ValueError(f"--top-k {config.top_k} exceeds the teacher's vocabulary of {teacher.vocab_size} ids.")
    layers = teacher.resolve_layers(config.hidden_layers)
    chat = _encoder(config, source, teacher)
    rows = iter_rows(source.dataset, teacher.tokenizer, text_field=config.text_field, seq_len=config.seq_len,
                     pack=config.pack, chat=chat)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{config.dataset} yields no samples: every document is empty after tokenization"
                         + (", or no conversation has anything to train on." if chat else "."))
    identity = teacher.identity()
    spec = TargetSpec(
        top_k=config.top_k if config.stores_topk else None,
        num_draws=config.num_draws if config.stores_draws else None,
        **logit_positions(teacher, config.chunk_positions),
        draws_from_tail=config.draws_from_tail,
        draw_scheme=config.draw_scheme,
        compiled=config.compile_extraction,
    )
    manifest = Manifest(
        teacher=identity,
        dataset={"source": source_id(config.dataset), "split": config.split, "text_field": config.text_field,
                 "fingerprint": getattr(source.dataset, "_fingerprint", None),
                 **(chat.manifest_entry() if chat else {}),
                 **({"generated_by": source.generated_by} if source.generated_by else {})},
        build={"seq_len": config.seq_len, "pack": config.pack, "max_samples": config.max_samples,
               "batch_size": config.batch_size, "samples_per_shard": config.samples_per_shard, "seed": config.seed,
               # Written only when set, so the headers of builds without it stay as they were (--resume compares).
               **({"document_attention": "isolated"} if source.isolated else {})},
        targets=_targets_section(spec, config, layers, identity["hidden_size"], teacher.target_properties())
        | ({"rollout": rollout.section(source.generated_by)} if chat is not None and chat.drawn else {}),
        created_by=f"teacher-cache {_version()}",
    )
    worker = _worker(config)
    writer = StoreWriter.open(config.output, manifest, resume=config.resume, worker=worker)
    if not writer.manifest.complete:  # a worker resumed after it had finished goes straight to the merge
        stream_samples = _run(config, teacher, writer, _chain(first, rows), spec, layers, source.isolated)
        writer.finish(stream_samples)
        if chat is not None:
            report_conversations(chat.counts, config)
    return writer.manifest if worker is None else _merge_if_finished(writer)


def _encoder(config: BuildConfig, source: Source, teacher: TeacherBackend) -> ChatEncoder | RolloutEncoder | None:
    """How the rows become documents: a generator's replies as the tokens it drew when it had the teacher's
    tokenizer (`storage.rollouts`), else conversations rendered with the chat template, or text (None)."""
    if source.generation is not None:
        encoder = rollout_encoder(source.dataset, source.generation, teacher.tokenizer, train_on=config.train_on,
                                  overlong=config.overlong)
        if encoder is not None:
            if encoder.drawn and config.pack and not source.isolated:
                raise ValueError("--document-attention cross: each reply of these rollouts was drawn with its own "
                                 "prompt as its only context, so its tokens must be scored in that context; leave "
                                 "--document-attention at auto (isolated), or build with --no-pack.")
            return encoder
    return encoder_for(config, source.format, source.chat_template, teacher.tokenizer)


def _worker(config: BuildConfig) -> WorkerSlot | None:
    """This process's part of a build shared by several workers; None for a build in one process."""
    return WorkerSlot(config.worker_index, config.num_workers) if config.num_workers > 1 else None


def _merge_if_finished(writer: StoreWriter) -> Manifest:
    """The merged store's manifest when this worker finished last, else its own."""
    merged = merge_if_finished(writer.location)
    if merged is not None:
        return merged
    log.info("worker %d of %d finished; the last worker to finish merges the store (or run `teacher-cache merge "
             "%s` once all have)", writer.worker.index, writer.worker.count, writer.location)
    return writer.manifest


def _run(config: BuildConfig, teacher: TeacherBackend, writer: StoreWriter, rows: Iterator[Rows],
         spec: TargetSpec, layers: tuple[int, ...], isolated: bool) -> int:
    """Compute and commit the shards this process still owes; returns the number of samples in the stream."""
    keep = _wanted_shards(writer)
    device = getattr(teacher, "device", torch.device("cpu"))
    planned = _planned_samples(config.max_samples, config.samples_per_shard, keep)
    label = "" if writer.worker is None else f" [worker {writer.worker.index}/{writer.worker.count}]"
    bar = tqdm(total=planned and planned * config.seq_len, unit="tok", unit_scale=True,
               desc=f"teacher-cache build{label}", dynamic_ncols=True, disable=config.worker_index != 0)
    began, samples, tokens = time.perf_counter(), 0, 0
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch
    stream = _Tally(rows)

    def committed(info: ShardInfo) -> None:
        bar.set_postfix(shards=len(writer.manifest.shards), refresh=False)

    with bar, BackgroundWriter(writer, config.samples_per_shard, on_commit=committed) as background:
        for first_row, batch in iter_batches(stream, config.batch_size, config.samples_per_shard, keep=keep,
                                             stop=config.max_samples):
            generator = torch.Generator(device).manual_seed(_batch_seed(config.seed, first_row))
            try:
                record = teacher.compute(batch, spec, layers, generator, TORCH_DTYPES[config.hidden_dtype],
                                         isolated=isolated)
            except NonFiniteLogits as exc:  # leaving the block aborts the writer: no shard holds this batch
                raise exc.in_store(first_row) from None
            entropy_sum += record["entropy"].sum(dtype=torch.float64)  # zero at untrained positions
            record = {name: value.to("cpu", non_blocking=True) for name, value in record.items()}
            record |= {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                       "loss_mask": batch.loss_mask, "segment_ids": batch.segment_ids}
            if batch.behaviour_logprob is not None:
                record[rollout.BEHAVIOUR_LOGPROB] = batch.behaviour_logprob
            background.put(first_row, record, ready=_ready_event(device))
            samples, tokens = samples + len(batch), tokens + int(batch.loss_mask.sum())
            bar.update(batch.loss_mask.size)
    elapsed = time.perf_counter() - began
    bound = "" if writer.manifest.targets["entropy"].get("exact", True) else " (a lower bound)"
    log.info("built %d samples, %d trained tokens in %.1fs (%.0f tok/s), mean teacher entropy%s %.3f nats, into "
             "%s%s", samples, tokens, elapsed, tokens / max(elapsed, 1e-9), bound, entropy_sum.item() / max(tokens, 1),
             writer.location, label)
    return stream.samples if config.max_samples is None else min(stream.samples, config.max_samples)


def _wanted_shards(writer: StoreWriter) -> Callable[[int], bool]:
    """Which global shards this run computes: its worker's (all without workers), less the committed ones."""
    done, worker = writer.committed_shards, writer.worker
    return lambda shard: shard not in done and (worker is None or worker.owns(shard))


def _planned_samples(max_samples: int | None, samples_per_shard: int, keep: Callable[[int], bool]) -> int | None:
    """Samples this run will compute, when --max-samples bounds the stream (for the progress bar)."""
    if max_samples is None:
        return None
    shards = range(-(-max_samples // samples_per_shard))
    return sum(min(samples_per_shard, max_samples - s * samples_per_shard) for s in shards if keep(s))


def iter_batches(rows: Iterator[Rows], batch_size: int, samples_per_shard: int, *,
                 keep: Callable[[int], bool] | None = None,
                 stop: int | None = None) -> Iterator[tuple[int, Rows]]:
    """(first sample index, batch) for the samples [0, stop) of the shards `keep(shard index)` accepts.

    Batches are cut so that none crosses a shard boundary. `keep` (None keeps every shard) skips the shards
    committed before a resume, and those of other workers.
    """
    position, pending = 0, None
    for block in _truncate(rows, stop):
        pending = block if pending is None else Rows.concat([pending, block])
        while len(pending) >= (size := _next_batch_size(position, batch_size, samples_per_shard)):
            if keep is None or keep(position // samples_per_shard):
                yield position, pending[:size]
            position, pending = position + size, pending[size:]
    while pending is not None and len(pending):  # the stream ended: a last, short batch
        size = min(len(pending), _next_batch_size(position, batch_size, samples_per_shard))
        if keep is None or keep(position // samples_per_shard):
            yield position, pending[:size]
        position, pending = position + size, pending[size:]


class _Tally:
    """A stream of sample blocks that counts the samples it has yielded."""

    def __init__(self, rows: Iterator[Rows]):
        self.rows, self.samples = rows, 0

    def __iter__(self) -> Iterator[Rows]:
        for block in self.rows:
            self.samples += len(block)
            yield block


def _next_batch_size(position: int, batch_size: int, samples_per_shard: int) -> int:
    return min(batch_size, samples_per_shard - position % samples_per_shard)


def _truncate(rows: Iterator[Rows], stop: int | None) -> Iterator[Rows]:
    seen = 0
    for block in rows:
        if stop is not None and seen + len(block) >= stop:
            yield block[: stop - seen]
            return
        seen += len(block)
        yield block


def logit_positions(teacher: TeacherBackend, chunk_positions: int | None = None) -> dict[str, int | None]:
    """`chunk_positions` (by default LOGIT_CHUNK_BYTES of logits) and `block_positions` (EXTRACT_BLOCK_BYTES of
    logits, at most a chunk; None on GPUs) of a TargetSpec for this teacher's device and vocabulary."""
    device = getattr(teacher, "device", torch.device("cpu")).type
    row_bytes = 4 * teacher.vocab_size
    chunk = chunk_positions or max(1, LOGIT_CHUNK_BYTES.get(device, LOGIT_CHUNK_BYTES["cpu"]) // row_bytes)
    block = EXTRACT_BLOCK_BYTES.get(device)
    return {"chunk_positions": chunk, "block_positions": block and min(chunk, max(1, block // row_bytes))}


def _batch_seed(seed: int, first_row: int) -> int:
    digest = hashlib.sha256(f"{seed}:{first_row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _ready_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize


def _targets_section(spec: TargetSpec, config: BuildConfig, layers: tuple[int, ...], hidden_size: int,
                     properties: dict) -> dict:
    """The manifest's `targets`: each wanted kind's sections (in `storage.targets.KINDS` order), then how the
    backend approximates a record (`properties`), then the hidden states."""
    targets: dict = {"entropy": {"exact": True}, "true_logprob": {}}
    wanted = {kind.name: kind for kind in wanted_extractors(spec)}
    for name in KINDS:
        if name in wanted:
            targets |= wanted[name].manifest_sections(spec, config.seed)
    for kind, entries in properties.items():
        if kind in targets:
            targets[kind] |= entries
    return targets | hidden.manifest_section(layers, config.hidden_dtype, hidden_size)


def _chain(first: Rows, rest: Iterator[Rows]) -> Iterator[Rows]:
    yield first
    yield from rest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("teacher-cache")
    except PackageNotFoundError:
        return "dev"
