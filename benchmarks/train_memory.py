"""Peak memory of one training step: cross-entropy against each distillation loss of the menu, at a realistic size.

What it checks: the losses never build a [batch, time, vocab] tensor (the student's logits exist one chunk of
positions at a time, the head inside the chunk), so a KD step's peak memory stays close to a CE step's computed the
same chunked way. The dense CE of a plain forward (`model(x).logits`, [batch, time, vocab] in fp32) is measured too,
for scale.

Each configuration runs in a fresh subprocess, so no allocator state carries over: a random Llama student, a batch
of random store-like targets (top-k ids + log-probs + tail, sampled ids + counts), one warm-up step, then one
measured step (student forward, loss, backward; no optimizer, gradients freed before it as the trainer does). On
CUDA: torch.cuda.max_memory_allocated above the memory allocated before the step, with bf16 autocast as the trainer
uses there. On CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set before
the step, with glibc told to hand every block of 64 KiB or more back to the OS when freed (MALLOC_MMAP_THRESHOLD_),
so that resident memory follows live tensors.

    python benchmarks/train_memory.py [--vocab 32000] [--batch 4] [--seq 512] [--hidden 512] [--layers 4] \\
        [--chunk 256] [--device cpu|cuda] [--only ce,forward_kl@topk_tail] [--json out.json]
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import click
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from student_train.loss_config import LossConfig  # noqa: E402
from student_train.losses import DIVERGENCES, REPRESENTATIONS, distillation_loss  # noqa: E402

K, DRAWN = 64, 24  # top-k ids, distinct sampled ids per position (about what 50 draws give)


def configurations() -> list[str]:
    """"ce" (the baseline, first), "ce_dense", and every allowed divergence@representation (0.9 KD + 0.1 CE)."""
    pairs = [f"{d}@{r}" for r in REPRESENTATIONS for d in DIVERGENCES if (d, r) != ("reverse_kl", "sampled")]
    return ["ce", "ce_dense", *pairs]


def make_batch(vocab: int, batch: int, seq: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Store-like records with distinct, ascending ids per position, built without any [B, L, V] tensor."""
    def spread_ids(width: int) -> torch.Tensor:
        stride = vocab // width
        start = torch.randint(stride, (batch, seq, 1), generator=generator)
        return start + stride * torch.arange(width)

    logits = torch.randn(batch, seq, K + 1, generator=generator)
    logp = F.log_softmax(logits, -1)
    return {
        "input_ids": torch.randint(vocab, (batch, seq + 1), generator=generator),
        "attention_mask": torch.ones(batch, seq + 1, dtype=torch.bool),
        "loss_mask": torch.ones(batch, seq, dtype=torch.bool),
        "topk_ids": spread_ids(K),
        "topk_logprobs": logp[..., :K].half().float(),
        "tail_logmass": logp[..., K],
        "sampled_ids": spread_ids(DRAWN),
        "sampled_counts": torch.randint(1, 5, (batch, seq, DRAWN), generator=generator).float(),
    }


def measure(name: str, options: dict) -> dict:
    """Run in the subprocess: one warm-up and one measured step of configuration `name`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(options["device"])
    torch.manual_seed(0)
    hidden, layers = options["hidden"], options["layers"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=options["vocab"], hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=options["seq"],
        tie_word_embeddings=False)).to(device)
    generator = torch.Generator().manual_seed(1)
    batch = {key: value.to(device) for key, value in make_batch(options["vocab"], options["batch"], options["seq"],
                                                                 generator).items()}
    inputs = batch["input_ids"][:, :-1]
    if name == "ce":
        config = LossConfig(weights={"ce": 1.0}, chunk_positions=options["chunk"])
    elif name != "ce_dense":
        divergence, targets = name.split("@")
        config = LossConfig(weights={divergence: 0.9, "ce": 0.1}, targets=targets, chunk_positions=options["chunk"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            if name == "ce_dense":
                logits = model(input_ids=inputs).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch["input_ids"][:, 1:].flatten())
            else:
                hidden_BLH = model.model(input_ids=inputs).last_hidden_state
        if name != "ce_dense":
            loss, _ = distillation_loss(hidden_BLH, model.lm_head, batch, config)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        before = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        step()
        peak = _status_bytes("VmHWM")
    return {"config": name, "before_mib": before / 2**20, "peak_mib": peak / 2**20, "step_mib": (peak - before) / 2**20}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


@click.command()
@click.option("--vocab", type=int, default=32000, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--seq", type=int, default=512, show_default=True)
@click.option("--hidden", type=int, default=512, show_default=True, help="Student width (heads of 64).")
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--chunk", type=int, default=256, show_default=True, help="Positions per loss chunk.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--only", help="Comma-separated configurations (default: all; ce is always measured).")
@click.option("--json", "json_path", help="Write the rows as JSON here.")
@click.option("--child", hidden=True, help="Measure this one configuration and print it as JSON.")
def main(json_path: str | None, only: str | None, child: str | None, **options) -> None:
    if child:
        click.echo(json.dumps(measure(child, options)))
        return
    names = configurations() if not only else ["ce", *[n for n in only.split(",") if n != "ce"]]
    argv = [f"--{key}={value}" for key, value in options.items()]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, __file__, *argv, "--child", name], env=env, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        ce = rows[0]
        row = rows[-1]
        row["peak_vs_ce"] = row["peak_mib"] / ce["peak_mib"]
        row["step_vs_ce"] = row["step_mib"] / ce["step_mib"]
        click.echo(f"{name:<24} before {row['before_mib']:8.0f} MiB  peak {row['peak_mib']:8.0f} MiB  step "
                   f"{row['step_mib']:8.0f} MiB   peak/ce {row['peak_vs_ce']:5.2f}  step/ce {row['step_vs_ce']:5.2f}")
    if json_path:
        info = {"platform": platform.platform(), "torch": torch.__version__, **options}
        Path(json_path).write_text(json.dumps({"setup": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
