"""Generation throughput of `teacher-cache generate`'s engines on one machine: the transformers engine (at a few batch
sizes) and vLLM, on the same prompts with the same sampling, each in a fresh process.

Each run renders the prompts with the model's chat template (`teacher_cache.prompts`), loads its engine
(`teacher_cache.generation.load_generator`), generates once to warm up on the first prompts, then times one
`generate` call over all of them: generated tokens per second of that call (model load and warm-up excluded).

    python benchmarks/generate_throughput.py --model .demo/smollm2 --prompts .demo/chat/heldout.jsonl

Writes benchmarks/results/generate_throughput.json (or --output) and prints a table with each run's tokens/s and
its ratio to the first row's, measured in the same invocation.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "generate_throughput.json"


def measure(backend: str, model: str, prompts: str, count: int, batch_size: int, max_new_tokens: int,
            gpu_memory_utilization: float) -> dict:
    """One run, in this process: tokens/s of one timed `generate` over `count` prompts."""
    from storage.dataset_options import Columns
    from storage.samples import load_samples_dataset
    from teacher_cache.generation import Sampling, load_generator
    from teacher_cache.prompts import PromptEncoder, prompt_turns

    dataset, fmt = load_samples_dataset(prompts, split="train", prompts_only=True)
    generator = load_generator(backend, model, device="auto", dtype="float32", batch_size=batch_size,
                               tensor_parallel_size=1, gpu_memory_utilization=gpu_memory_utilization, seed=0)
    encoder = PromptEncoder(generator.tokenizer, None)
    encoded = [(i, encoder.encode(prompt_turns(row, fmt, Columns(), i, None), i))
               for i, row in enumerate(dataset.select(range(count)))]
    sampling = Sampling(temperature=1.0, max_new_tokens=max_new_tokens, seed=0)
    generator.generate(encoded[:2], Sampling(temperature=1.0, max_new_tokens=8, seed=1))  # warm-up
    start = time.perf_counter()
    responses = generator.generate(encoded, sampling)
    seconds = time.perf_counter() - start
    generator.close()
    tokens = sum(len(r.token_ids) for r in responses)
    return {"backend": backend, "batch_size": batch_size if backend == "transformers" else None, "prompts": count,
            "prompt_tokens": sum(len(ids) for _, ids in encoded), "generated_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


@click.command()
@click.option("--model", required=True, help="Local model directory with a chat template.")
@click.option("--prompts", required=True, help="Prompts (messages, prompt or text rows).")
@click.option("--count", type=int, default=64, show_default=True, help="Prompts per run.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--batch-sizes", default="16,64", show_default=True, help="Batch sizes of the transformers engine.")
@click.option("--vllm/--no-vllm", default=True, show_default=True, help="Also measure the vLLM engine.")
@click.option("--gpu-memory-utilization", type=float, default=0.3, show_default=True)
@click.option("--output", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@click.option("--run", "run_json", default=None, hidden=True, help="Internal: one run's arguments as JSON.")
def main(model, prompts, count, max_new_tokens, batch_sizes, vllm, gpu_memory_utilization, output, run_json):
    """Tokens/s of each engine on the same prompts (see the module docstring)."""
    if run_json is not None:
        click.echo(json.dumps(measure(**json.loads(run_json))))
        return
    runs = [("transformers", int(b)) for b in batch_sizes.split(",")] + ([("vllm", 0)] if vllm else [])
    results = []
    for backend, batch_size in runs:
        arguments = {"backend": backend, "model": model, "prompts": prompts, "count": count,
                     "batch_size": batch_size or 1, "max_new_tokens": max_new_tokens,
                     "gpu_memory_utilization": gpu_memory_utilization}
        done = subprocess.run([sys.executable, __file__, "--model", model, "--prompts", prompts, "--run",
                               json.dumps(arguments)], capture_output=True, text=True, env=os.environ)
        if done.returncode != 0:
            raise click.ClickException(f"the {backend} run failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    baseline = results[0]["tokens_per_s"]
    report = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "model": model, "max_new_tokens": max_new_tokens, "runs": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"{'engine':<28}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'ratio':>7}")
    for r in results:
        name = r["backend"] + (f" (batch {r['batch_size']})" if r["batch_size"] else "")
        click.echo(f"{name:<28}{r['generated_tokens']:>8}{r['seconds']:>9.1f}{r['tokens_per_s']:>8.1f}"
                   f"{r['tokens_per_s'] / baseline:>7.2f}")


if __name__ == "__main__":
    main()
