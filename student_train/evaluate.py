"""`student-train eval`: a teacher and its student side by side on held-out text, written as a report.

Flow: held-out rows (the tail of a store that training held out, or a text file tokenized and packed as a build
does) -> both models forward on the same batches, each output head applied a chunk of positions at a time ->
`eval_metrics.ScoreTotals` (LM loss, KL, agreement, calibration) -> parameters and weight bytes -> speed and peak
memory, each model alone in a fresh process (`eval_speed`) -> report.json, report.md, report.png (`eval_report`).

Unlike training, the teacher runs here: its metrics come from its own full softmax and KL(teacher || student) is
exact over the whole vocabulary; a store provides only token ids and masks. Both models are loaded as
`storage.causal_lm.CausalLM`, whose `logits` applies the output head (and any logit post-processing) to hidden states,
as the build does.

Legend: B batch, L positions, H hidden size, P trained positions, V / W teacher / student vocabulary.
"""

from __future__ import annotations

import gc
import importlib.metadata
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from storage.causal_lm import DTYPES, CausalLM, forward_inputs, resolve_device
from storage.conversations import encoder_for
from storage.dataset_options import ConversationOptions, DatasetOptions
from storage.identity import tokenizer_fingerprint, weights_fingerprint
from storage.manifest import isolates_documents
from storage.options import option
from storage.reader import Store
from storage.samples import Rows, iter_rows, load_samples_dataset
from student_train.eval_metrics import ScoreTotals, parameter_count, weight_bytes
from student_train.eval_report import ratios, write_report
from student_train.eval_speed import measure_in_fresh_process
from student_train.loader import LoaderConfig
from student_train.order import held_out_range
from student_train.student import WEIGHT_FILES, compatibility_problems

log = logging.getLogger(__name__)

DEFAULT_HELD_OUT_FRACTION = 0.05  # TrainConfig.eval_fraction's default
DEFAULT_SEQ_LEN = 512
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
REPORT_VERSION = 1


@dataclass(kw_only=True)
class EvalConfig(ConversationOptions, DatasetOptions):
    """Options of `student-train eval`: each field's help says what it does; how --data is read (its shape and
    columns, and how its conversations become rows) are the options of the two groups it inherits."""

    teacher: str = option(help="The teacher's local HF model directory (weights, config, tokenizer).")
    student: str = option(help="The student's model directory (weights and tokenizer), e.g. a student-train --output.")
    store: str | None = option(None, help="Store written by `teacher-cache build`: its held-out tail is evaluated "
                                          "(only its token ids and masks are read).")
    data: str | None = option(None, help="Instead of --store: text or conversations (jsonl/json/parquet/csv/txt, a "
                                         "folder, a saved dataset), tokenized with the teacher's tokenizer (its chat "
                                         "template for conversations) and packed; every row is evaluated.")
    seq_len: int | None = option(None, help=f"Positions per row with --data. Default: {DEFAULT_SEQ_LEN}. A store's "
                                            "rows keep its build's length.")
    samples: int | None = option(None, help="Evaluate at most this many rows (the first of the held-out part).")
    held_out_fraction: float | None = option(
        None, help="Evaluate the store's last samples, the share training held out with the same --eval-fraction. "
                   f"Default: {DEFAULT_HELD_OUT_FRACTION}, training's default.")
    all_samples: bool = option(False, flag="--all", help="Evaluate every sample of --store (a held-out store).")
    output: str | None = option(None, help="Directory of report.json, report.md and report.png. Default: "
                                           "STUDENT/eval.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", choices=DTYPES, help="Weights of both models; auto = bfloat16 on CUDA, float32 on "
                                                     "CPU. Log-probs are fp32.")
    batch_size: int = option(8, help="Rows per forward.")
    chunk_positions: int = option(256, help="Positions whose logits exist at once, per model (memory vs speed).")

    def __post_init__(self) -> None:
        if (self.store is None) == (self.data is None):
            raise ValueError("pass exactly one of --store (a teacher-cache store; its held-out tail is evaluated) "
                             "and --data (a text file or dataset).")
        if self.data is not None:
            given = [name for name, value in (("--held-out-fraction", self.held_out_fraction),
                                              ("--all", self.all_samples)) if value]
            if given:
                raise ValueError(f"{', '.join(given)}: only with --store; every row of --data is evaluated.")
        if self.store is not None and self.seq_len is not None:
            raise ValueError("--seq-len: only with --data; a store's rows keep the length it was built with.")
        if self.all_samples and self.held_out_fraction is not None:
            raise ValueError("--all and --held-out-fraction: pass at most one.")
        if self.held_out_fraction is not None and not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"--held-out-fraction: must be within (0, 1), got {self.held_out_fraction}.")
        for name in ("samples", "seq_len", "batch_size", "chunk_positions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {value}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}.")


def evaluate(config: EvalConfig) -> dict:
    """Evaluate teacher and student as configured, write the report files and return the report.

    Raises:
        ValueError: a missing model, a student without weights or tokenizer, tokenizers that differ, a store with
            no held-out rows, bad options.
        RuntimeError: a store that cannot be read.
    """
    _check_model_dirs(config)
    device = resolve_device(config.device)
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    store = Store(config.store) if config.store is not None else None
    teacher_tokenizer = _check_tokenizers(config, store)
    if store is not None:
        rows, evaluated_on = _store_rows(store, config)
        isolated = isolates_documents(store.manifest.build)  # read as the store's teacher did
    else:
        rows, evaluated_on, isolated = _data_rows(config, teacher_tokenizer)
    log.info("evaluating %s and %s on %d rows (%d tokens) on %s in %s", config.teacher, config.student, len(rows),
             int(rows.loss_mask.sum()), device, dtype)

    models = {"teacher": config.teacher, "student": config.student}
    loaded = {name: CausalLM(path, device=str(device), dtype=dtype) for name, path in models.items()}
    metrics = score(loaded["teacher"], loaded["student"], rows, batch_size=config.batch_size,
                    chunk_positions=config.chunk_positions, isolated=isolated).result()
    for name, lm in loaded.items():
        metrics[name].update(parameters=parameter_count(lm.model), disk_bytes=weight_bytes(models[name]))
    del loaded, lm
    _release_memory(device)
    for name, path in models.items():
        log.info("timing the %s's forward and measuring its peak memory in a fresh process", name)
        metrics[name].update(measure_in_fresh_process(
            path, device=str(device), dtype=dtype, input_ids=rows.input_ids, attention_mask=rows.attention_mask,
            batch_size=config.batch_size, chunk_positions=config.chunk_positions))

    report = {
        "format": "student-train-eval", "format_version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **{name: {"path": str(Path(path).resolve()), **metrics[name]} for name, path in models.items()},
        "ratios": ratios(metrics["teacher"], metrics["student"]),
        "evaluated_on": {**evaluated_on, "tokens": metrics["student"]["tokens"]},
        "device": str(device), "dtype": dtype, "machine": _machine(device), "versions": _versions(),
        "config": asdict(config),
    }
    write_report(report, Path(config.output) if config.output else Path(config.student) / "eval")
    return report


@torch.inference_mode()
def score(teacher: CausalLM, student: CausalLM, rows: Rows, *, batch_size: int, chunk_positions: int,
          isolated: bool = False) -> ScoreTotals:
    """Both models over the rows, batch by batch; the metrics' sums over every loss-mask position. With `isolated`,
    each packed document is read alone (`forward_inputs`)."""
    device = teacher.device
    totals = ScoreTotals()
    start = time.perf_counter()
    with tqdm(total=len(rows), unit="row", desc="eval", dynamic_ncols=True) as bar:
        for first in range(0, len(rows), batch_size):
            batch = rows[first:first + batch_size]
            ids_BL1 = torch.from_numpy(batch.input_ids).to(device)
            mask_BL = torch.from_numpy(batch.attention_mask[:, :-1]).to(device)
            segments_BL = torch.from_numpy(batch.segment_ids[:, :-1].astype(np.int64)).to(device) if isolated else None
            trained_P = torch.from_numpy(batch.loss_mask).to(device).flatten().nonzero().squeeze(1)
            target_P = ids_BL1[:, 1:].flatten()[trained_P]
            inputs = forward_inputs(ids_BL1[:, :-1], mask_BL, segments_BL)
            hidden_PH = [lm.model.base_model(**inputs).last_hidden_state.flatten(0, 1)[trained_P]
                         for lm in (teacher, student)]
            for i in range(0, len(target_P), chunk_positions):
                # one chunk's [chunk, V] and [chunk, W] log-probs at a time
                teacher_PV, student_PW = (lm.logits(h[i:i + chunk_positions]).float().log_softmax(-1)
                                          for lm, h in zip((teacher, student), hidden_PH, strict=True))
                totals.add(teacher_PV, student_PW, target_P[i:i + chunk_positions])
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{totals.tokens / (time.perf_counter() - start):.0f}")
    return totals


def read_rows(store: Store, start: int, stop: int) -> Rows:
    """Rows [start, stop) of a store: tokens, masks and segment ids only, a shard at a time."""
    blocks, shard_start = [], 0
    for shard in store.shards:
        lo, hi = max(start - shard_start, 0), min(stop - shard_start, len(shard))
        if lo < hi:
            ids, attention, loss, segments = (shard.array(name)[lo:hi] for name in
                                              ("input_ids", "attention_mask", "loss_mask", "segment_ids"))
            blocks.append(Rows(ids.astype(np.int64), attention, loss, segments))
        shard_start += len(shard)
    return Rows.concat(blocks)


def _check_model_dirs(config: EvalConfig) -> None:
    for flag, path in (("--teacher", config.teacher), ("--student", config.student)):
        if not Path(path).is_dir():
            raise ValueError(f"{flag} {path}: no such directory; pass a local Hugging Face model directory "
                             "(config, weights and tokenizer).")
    student = Path(config.student)
    if not any((student / name).exists() for name in WEIGHT_FILES):
        raise ValueError(f"--student {student}: no weights ({', '.join(WEIGHT_FILES)}); pass a trained student, "
                         "e.g. the --output directory of `student-train`.")
    if not any((student / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"--student {student}: no tokenizer; save the teacher's tokenizer beside its weights "
                         "(`student-train` saves it in its --output).")


def _check_tokenizers(config: EvalConfig, store: Store | None):
    """Both models must read the same token ids: the store's teacher's tokenizer, or the teacher's with --data.

    Returns the teacher's tokenizer.
    """
    teacher_tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    teacher_vocab = AutoConfig.from_pretrained(config.teacher).vocab_size
    student_tokenizer = AutoTokenizer.from_pretrained(config.student)
    student_vocab = AutoConfig.from_pretrained(config.student).vocab_size
    if store is not None:
        manifest = store.manifest
        problems = [_tokenizer_mismatch("--teacher", config.teacher, teacher_tokenizer, manifest.teacher,
                                        f"the store's teacher {manifest.teacher['model']}",
                                        "Pass the teacher that built the store, or evaluate on --data.")]
        problems += compatibility_problems(student_tokenizer, student_vocab, manifest, config.student)
        if not problems[0] and weights_fingerprint(config.teacher) != manifest.teacher["weights_sha256"]:
            log.warning("--teacher %s has other weights than the teacher %s that built %s; evaluating on the "
                        "store's tokens anyway", config.teacher, manifest.teacher["model"], config.store)
    else:
        reference = {"tokenizer_sha256": tokenizer_fingerprint(teacher_tokenizer),
                     "tokenizer_vocab_size": len(teacher_tokenizer)}
        problems = [_tokenizer_mismatch("--student", config.student, student_tokenizer, reference,
                                        f"the teacher {config.teacher}", "Use a student with the teacher's tokenizer.")]
        if student_vocab < teacher_vocab:
            problems.append(f"vocab size mismatch: the student {config.student} predicts {student_vocab} ids, the "
                            f"teacher {teacher_vocab}. Resize the student's embeddings to at least {teacher_vocab}.")
    problems = [p for p in problems if p]
    if problems:
        raise ValueError("\n".join(problems))
    return teacher_tokenizer


def _tokenizer_mismatch(option: str, path: str, tokenizer, reference: dict, reference_name: str,
                        fix: str) -> str | None:
    """A problem when `tokenizer` is not the one `reference` (a manifest's teacher section) fingerprints."""
    found = tokenizer_fingerprint(tokenizer)
    if found == reference["tokenizer_sha256"]:
        return None
    return (f"tokenizer mismatch: {option} {path} has {len(tokenizer)} tokens (sha256 {found[:12]}), "
            f"{reference_name} {reference['tokenizer_vocab_size']} (sha256 {reference['tokenizer_sha256'][:12]}); "
            f"the same ids would mean other text to each. {fix}")


def _store_rows(store: Store, config: EvalConfig) -> tuple[Rows, dict]:
    total = len(store)
    if config.all_samples:
        start, stop = 0, total
    else:
        fraction = config.held_out_fraction or DEFAULT_HELD_OUT_FRACTION
        start, stop = held_out_range(total, LoaderConfig(store=config.store, batch_size=1,
                                                         only_fraction_from_end=fraction))
        if start == stop:
            raise ValueError(f"--held-out-fraction {fraction}: {config.store} has {total} samples, and "
                             f"round({fraction} x {total}) = 0 leaves none held out; pass a larger "
                             "--held-out-fraction, --all for a store kept apart for evaluation, or --data.")
    if config.samples is not None:
        stop = min(stop, start + config.samples)
    return read_rows(store, start, stop), {"store": config.store, "first_sample": start, "samples": stop - start,
                                           "store_samples": total, "seq_len": store.manifest.build["seq_len"]}


def _data_rows(config: EvalConfig, tokenizer) -> tuple[Rows, dict, bool]:
    """The rows of --data, what they are, and whether their packed documents attend only to themselves."""
    dataset, fmt = load_samples_dataset(config.data, split=config.split, fields=config.columns,
                                        dataset_format=config.dataset_format)
    chat = encoder_for(config, fmt, config.template_text(fmt, config.data), tokenizer)
    seq_len = config.seq_len or DEFAULT_SEQ_LEN
    blocks, count = [], 0
    for block in iter_rows(dataset, tokenizer, text_field=config.text_field, seq_len=seq_len, pack=True, chat=chat):
        blocks.append(block)
        count += len(block)
        if config.samples is not None and count >= config.samples:
            break
    if not blocks:
        raise ValueError(f"--data {config.data}: its text makes no row of two tokens or more; pass more text.")
    rows = Rows.concat(blocks)[:config.samples]
    if not rows.loss_mask.any():
        raise ValueError(f"--data {config.data}: no token of its rows is trained under --train-on {config.train_on}, "
                         "so there is nothing to score; choose another --train-on.")
    attention = config.attention(fmt)
    described = {"data": config.data, "split": config.split, "format": fmt, "samples": len(rows), "seq_len": seq_len,
                 "document_attention": attention}
    if chat is not None:
        described["train_on"] = config.train_on
    return rows, described, attention == "isolated"


def _release_memory(device: torch.device) -> None:
    """Free both models before the measuring processes load them again."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _machine(device: torch.device) -> dict:
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "teacher-cache": importlib.metadata.version("teacher-cache")}
