"""`build_cache`: dataset -> samples -> teacher -> targets -> background shard writer -> manifest.

Batches never cross a shard boundary and the draws of a batch come from a generator seeded by (seed, first
sample of the batch), so the content of every shard is a pure function of the options: a resumed build
writes exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from storage.fs import Location
from storage.manifest import Manifest, ShardInfo
from storage.writer import BackgroundWriter, StoreWriter
from teacher_cache.config import BuildConfig
from teacher_cache.data import Rows, iter_rows, load_text_dataset
from teacher_cache.targets import TargetSpec
from teacher_cache.teacher import TORCH_DTYPES, TeacherBackend, load_teacher

log = logging.getLogger(__name__)

# fp32 logits materialised at once. On CPU, large blocks are mapped and unmapped by the allocator at every chunk
# (measured: 23% slower builds at 256 MiB than at 32 MiB); GPUs want big chunks for kernel efficiency.
LOGIT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


def build_cache(config: BuildConfig, *, teacher: TeacherBackend | None = None) -> Manifest:
    """Run the teacher over the dataset and write its targets to `config.output`.

    Args:
        config: the build's options.
        teacher: an already loaded backend (loaded from `config.model` when None).

    Returns:
        The completed store's manifest.
    """
    output = Location(config.output)
    if output.local and output.root.exists() and not output.root.is_dir():
        raise ValueError(f"--output {config.output} is an existing file; give a directory for the store.")
    if not config.resume and output.listdir():
        raise ValueError(
            f"Output {config.output} already exists and is not empty. Pass --resume to continue an "
            "interrupted build into it, or choose a new --output."
        )
    dataset = load_text_dataset(config.dataset, split=config.split, text_field=config.text_field)
    owned = teacher is None
    teacher = teacher or load_teacher(config)
    try:
        return _build(config, output, dataset, teacher)
    finally:
        if owned:
            teacher.close()


def _build(config: BuildConfig, output: Location, dataset, teacher: TeacherBackend) -> Manifest:
    if "topk" in config.targets and config.top_k > teacher.vocab_size:
        raise ValueError(f"--top-k {config.top_k} exceeds the teacher's vocabulary of {teacher.vocab_size} ids.")
    layers = teacher.resolve_layers(config.hidden_layers)
    rows = iter_rows(dataset, teacher.tokenizer, text_field=config.text_field, seq_len=config.seq_len,
                     pack=config.pack)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{config.dataset} yields no samples: every document is empty after tokenization.")
    identity = teacher.identity()
    manifest = Manifest(
        teacher=identity,
        dataset={"source": _source_id(config.dataset), "split": config.split, "text_field": config.text_field,
                 "fingerprint": getattr(dataset, "_fingerprint", None)},
        build={"seq_len": config.seq_len, "pack": config.pack, "max_samples": config.max_samples,
               "batch_size": config.batch_size, "samples_per_shard": config.samples_per_shard, "seed": config.seed},
        targets=_targets_section(config, layers, identity["hidden_size"], teacher.target_properties()),
        created_by=f"teacher-cache {_version()}",
    )
    writer = StoreWriter.open(config.output, manifest, resume=config.resume)
    spec = TargetSpec(
        top_k=config.top_k if "topk" in config.targets else None,
        num_draws=config.num_draws if "sampled" in config.targets else None,
        chunk_positions=config.chunk_positions or max(1, _logit_budget(teacher) // (4 * teacher.vocab_size)),
    )
    _run(config, teacher, writer, _chain(first, rows), spec, layers)
    return writer.finish()


def _run(config: BuildConfig, teacher: TeacherBackend, writer: StoreWriter, rows: Iterator[Rows],
         spec: TargetSpec, layers: tuple[int, ...]) -> None:
    start = writer.committed_samples
    device = getattr(teacher, "device", torch.device("cpu"))
    bar = tqdm(total=config.max_samples and (config.max_samples - start) * config.seq_len, unit="tok",
               unit_scale=True, desc="teacher-cache build", dynamic_ncols=True)
    began, tokens = time.perf_counter(), 0
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per batch

    def committed(info: ShardInfo) -> None:
        bar.set_postfix(shards=len(writer.manifest.shards), refresh=False)

    with bar, BackgroundWriter(writer, config.samples_per_shard, on_commit=committed) as background:
        for first_row, batch in iter_batches(rows, config.batch_size, config.samples_per_shard, start=start,
                                             stop=config.max_samples):
            generator = torch.Generator(device).manual_seed(_batch_seed(config.seed, first_row))
            record = teacher.compute(batch, spec, layers, generator, TORCH_DTYPES[config.hidden_dtype])
            entropy_sum += record["entropy"].sum(dtype=torch.float64)  # zero at untrained positions
            record = {name: value.to("cpu", non_blocking=True) for name, value in record.items()}
            record |= {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                       "loss_mask": batch.loss_mask, "segment_ids": batch.segment_ids}
            background.put(record, ready=_ready_event(device))
            tokens += int(batch.loss_mask.sum())
            bar.update(batch.loss_mask.size)
    elapsed = time.perf_counter() - began
    log.info("built %d samples, %d trained tokens in %.1fs (%.0f tok/s), mean teacher entropy %.3f nats, into %s",
             writer.committed_samples - start, tokens, elapsed, tokens / max(elapsed, 1e-9),
             entropy_sum.item() / max(tokens, 1), writer.location)


def iter_batches(rows: Iterator[Rows], batch_size: int, samples_per_shard: int, *, start: int = 0,
                 stop: int | None = None) -> Iterator[tuple[int, Rows]]:
    """(first sample index, batch) for samples [start, stop), cut so that no batch crosses a shard boundary.

    `start` is a shard boundary (a resumed build starts after its last committed shard).
    """
    assert start % samples_per_shard == 0, (start, samples_per_shard)
    position, pending = 0, None
    for block in _truncate(rows, stop):
        pending = block if pending is None else Rows.concat([pending, block])
        while len(pending) >= (size := _next_batch_size(position, batch_size, samples_per_shard)):
            if position >= start:
                yield position, pending[:size]
            position, pending = position + size, pending[size:]
    while pending is not None and len(pending):  # the stream ended: a last, short batch
        size = min(len(pending), _next_batch_size(position, batch_size, samples_per_shard))
        if position >= start:
            yield position, pending[:size]
        position, pending = position + size, pending[size:]


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


def _logit_budget(teacher: TeacherBackend) -> int:
    device = getattr(teacher, "device", torch.device("cpu"))
    return LOGIT_CHUNK_BYTES.get(device.type, LOGIT_CHUNK_BYTES["cpu"])


def _batch_seed(seed: int, first_row: int) -> int:
    digest = hashlib.sha256(f"{seed}:{first_row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _ready_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event.synchronize


def _targets_section(config: BuildConfig, layers: tuple[int, ...], hidden_size: int, properties: dict) -> dict:
    targets: dict = {"entropy": {"exact": True}, "true_logprob": {}}
    if "topk" in config.targets:
        targets["topk"] = {"k": config.top_k, "logprob_dtype": "float16", "order": "ascending id",
                           "tail": "tail_logmass"}
    if "sampled" in config.targets:
        targets["sampled"] = {"num_draws": config.num_draws, "temperature": 1.0, "seed": config.seed,
                              "source": "full distribution", "replacement": True}
    for kind, entries in properties.items():  # how the backend approximates a record
        if kind in targets:
            targets[kind] |= entries
    if layers:
        targets["hidden_states"] = {"layers": list(layers), "dtype": config.hidden_dtype,
                                    "hidden_size": hidden_size}
    return targets


def _source_id(source: str) -> str:
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _chain(first: Rows, rest: Iterator[Rows]) -> Iterator[Rows]:
    yield first
    yield from rest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("teacher-cache")
    except PackageNotFoundError:
        return "dev"
