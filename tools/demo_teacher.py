"""Build a small, genuinely trained Llama-style teacher for demos and end-to-end tests.

This sits before the pipeline: it produces the teacher model directory that the teacher backends load. A
randomly initialised model gives near-uniform next-token distributions, which exercise none of the interesting
paths (peaked top-k, small tail mass); a few minutes of CPU training on Shakespeare plus Python source gives
distributions with an entropy of a few nats, like a real LM's.

Shape legend: B batch, T time (seq_len), V vocab.
"""

import hashlib
import json
import logging
import math
import os
import random
import shutil
import sysconfig
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from storage.identity import tokenizer_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "llama2-tokenizer"
CHUNK_CHARS = 2000
DEMO_VOCAB = 4096
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
OPTIM = {"lr": 3e-3, "warmup_steps": 50, "final_lr_fraction": 0.1, "weight_decay": 0.1, "grad_clip": 1.0}
# bf16 autocast only pays off on CPUs with AMX; on this AVX512-only host fp32 steps measured ~1.6x faster.
USE_BF16 = False
LOG_EVERY = 20
HELDOUT_WINDOWS = 64


def _shakespeare_chunks() -> list[str]:
    """Splits tinyshakespeare into documents of about CHUNK_CHARS characters at paragraph boundaries."""
    chunks, current = [], []
    for paragraph in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n"):
        current.append(paragraph)
        if sum(len(p) for p in current) >= CHUNK_CHARS:
            chunks.append("\n\n".join(current))
            current = []
    return chunks + (["\n\n".join(current)] if current else [])


def _stdlib_sources() -> list[str]:
    """Returns the standard library's .py files, sorted by path, outside site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    # A handful of stdlib test files are deliberately not UTF-8; replacement keeps them deterministic.
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def _write_jsonl(path: Path, docs: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)


def build_corpus(
    output_dir: Path, *, max_bytes: int = 8_000_000, heldout_fraction: float = 0.05, seed: int = 0
) -> dict[str, Path]:
    """Writes a small mixed-domain text corpus as JSONL, split into train and held-out documents.

    Args:
        output_dir: Directory for train.jsonl and heldout.jsonl (created if missing).
        max_bytes: Total UTF-8 size of all documents; the document that would cross it and all later ones
            are dropped.
        heldout_fraction: Fraction of documents held out, chosen by a shuffle seeded with `seed`.
        seed: Seed of the held-out shuffle.

    Returns:
        {"train": path, "heldout": path}.
    """
    docs, total = [], 0
    for doc in _shakespeare_chunks() + _stdlib_sources():
        size = len(doc.encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append(doc)
        total += size
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    heldout = set(order[: max(1, round(heldout_fraction * len(docs)))])
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"train": output_dir / "train.jsonl", "heldout": output_dir / "heldout.jsonl"}
    _write_jsonl(paths["train"], [d for i, d in enumerate(docs) if i not in heldout])
    _write_jsonl(paths["heldout"], [d for i, d in enumerate(docs) if i in heldout])
    logger.info("corpus: %d documents, %.1f MB, %d held out", len(docs), total / 1e6, len(heldout))
    return paths


def _token_stream(path: Path, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Tokenizes a JSONL file into one flat int64 stream with EOS after every document."""
    texts = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]], dtype=torch.long)


def _lr_at(step: int, planned_steps: int | None) -> float:
    """Linear warmup, then cosine decay to final_lr_fraction of the peak at planned_steps.

    Warmup takes at most a fifth of the planned steps, so that short (e.g. slow, time-bound) runs still reach the
    peak learning rate and decay; until planned_steps is known it assumes the full warmup.
    """
    warmup = OPTIM["warmup_steps"] if planned_steps is None else min(OPTIM["warmup_steps"], planned_steps // 5)
    if step < warmup:
        return OPTIM["lr"] * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, planned_steps - warmup))
    floor = OPTIM["final_lr_fraction"]
    return OPTIM["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _next_token_loss(model: LlamaForCausalLM, windows_BT1: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=USE_BF16):
        logits_BTV = model(input_ids=windows_BT1[:, :-1]).logits
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), windows_BT1[:, 1:].flatten())


def _train(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    *,
    max_seconds: float | None,
    max_steps: int | None,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> tuple[int, float]:
    """Trains on random windows of the stream.

    Returns:
        (steps done, mean train loss of the last LOG_EVERY steps).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    offsets_T1 = torch.arange(seq_len + 1)
    planned = max_steps
    tokens_per_step = batch_size * seq_len
    bar = tqdm(total=planned * tokens_per_step if planned else None, unit="tok", unit_scale=True, desc="train")
    recent: list[float] = []
    start, step = time.monotonic(), 0
    model.train()
    while (max_steps is None or step < max_steps) and (max_seconds is None or time.monotonic() - start < max_seconds):
        starts_B = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
        loss = _next_token_loss(model, stream[starts_B[:, None] + offsets_T1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, planned)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recent = (recent + [loss.item()])[-LOG_EVERY:]
        bar.update(tokens_per_step)
        bar.set_postfix(step=step, loss=f"{recent[-1]:.3f}")
        if max_steps is None and step >= 5:
            # Re-estimated every step, not only after the first 5: on a shared CPU the speed drifts by 2-4x.
            planned = int(max_seconds * step / (time.monotonic() - start))
            bar.total = planned * tokens_per_step
        if step % LOG_EVERY == 0:
            lr = optimizer.param_groups[0]["lr"]
            logger.info("step %d/~%d  loss %.4f  lr %.2e", step, planned, sum(recent) / len(recent), lr)
    bar.close()
    return step, sum(recent) / len(recent)


@torch.no_grad()
def _heldout_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Mean next-token loss over up to HELDOUT_WINDOWS non-overlapping windows spread evenly over the stream.

    Spreading matters: the held-out documents keep corpus order (Shakespeare first, then Python), so windows
    from the start alone would measure only Shakespeare.
    """
    n = min(HELDOUT_WINDOWS, len(stream) // (seq_len + 1))
    starts_N = torch.linspace(0, len(stream) - seq_len - 1, n).long()
    windows_NT1 = stream[starts_N[:, None] + torch.arange(seq_len + 1)]
    model.eval()
    losses = [_next_token_loss(model, w) * len(w) for w in windows_NT1.split(batch_size)]
    return (torch.stack(losses).sum() / n).item()


def _is_cached(output_dir: Path, recipe: dict) -> bool:
    path = output_dir / "recipe.json"
    if not path.exists():
        return False
    saved = json.loads(path.read_text())
    return all(saved.get(k) == v for k, v in recipe.items())


def _publish(tmp_dir: Path, output_dir: Path) -> None:
    """Swaps tmp_dir in as output_dir, carrying over a corpus/ that lives inside the old output_dir."""
    if output_dir.exists():
        if (output_dir / "corpus").exists():
            os.replace(output_dir / "corpus", tmp_dir / "corpus")
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
        os.replace(tmp_dir, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, output_dir)


def train_tokenizer(corpus: Path, output_dir: Path, *, vocab_size: int = DEMO_VOCAB) -> Path:
    """A byte-level BPE tokenizer trained on corpus/train.jsonl, saved as a Hugging Face tokenizer (cached).

    A small vocabulary makes the output layer, which dominates a small model's cost on a CPU, several times cheaper,
    so the demo teacher sees many more tokens in the same minutes.
    """
    if (output_dir / "tokenizer.json").exists():
        return output_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = (json.loads(line)["text"] for line in (corpus / "train.jsonl").open(encoding="utf-8"))
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = ("<s>", bpe.token_to_id("<s>"))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, output_dir)
    return output_dir


def build_demo_teacher(
    output_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    corpus: Path | None = None,
    max_seconds: float | None = 240,
    max_steps: int | None = None,
    seq_len: int = 256,
    batch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Trains a small Llama teacher and saves it as a Hugging Face model directory, or reuses a cached one.

    Args:
        output_dir: Model directory to write; also holds recipe.json and, by default, corpus/.
        tokenizer_dir: Hugging Face tokenizer directory; it fixes the vocabulary and is saved with the model.
            None trains a small byte-level BPE tokenizer on the corpus (`train_tokenizer`).
        corpus: Directory with train.jsonl and heldout.jsonl; defaults to output_dir/corpus, built if missing.
        max_seconds: Wall-clock budget of the training loop; None for none (then `max_steps` is required).
        max_steps: Step budget; training stops at whichever budget runs out first. A step budget alone gives the
            same teacher on any machine, however busy.
        seq_len: Training window length in tokens.
        batch_size: Windows per optimizer step.
        seed: Seed of the initialisation and of the window sampling.

    Returns:
        output_dir.
    """
    if max_seconds is None and max_steps is None:
        raise ValueError("give the teacher a budget: max_seconds, max_steps or both.")
    corpus = corpus or output_dir / "corpus"
    if not (corpus / "heldout.jsonl").exists():  # build_corpus writes it last
        build_corpus(corpus)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or train_tokenizer(corpus, corpus / "tokenizer"))
    budget = {"max_seconds": max_seconds, "max_steps": max_steps, "seq_len": seq_len, "batch_size": batch_size}
    corpus_sha256 = hashlib.sha256((corpus / "train.jsonl").read_bytes()).hexdigest()
    recipe = {"format_version": FORMAT_VERSION, **budget, "seed": seed, "corpus_sha256": corpus_sha256}
    recipe |= {"vocab_size": len(tokenizer), "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "bf16": USE_BF16,
               **MODEL_SHAPE, **OPTIM}
    if _is_cached(output_dir, recipe):
        logger.info("reusing demo teacher in %s", output_dir)
        return output_dir

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    logger.info("teacher: %.1fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    train_stream = _token_stream(corpus / "train.jsonl", tokenizer)
    logger.info("train stream: %d tokens", len(train_stream))
    steps, train_loss = _train(model, train_stream, **budget, seed=seed)
    heldout = _heldout_loss(model, _token_stream(corpus / "heldout.jsonl", tokenizer), seq_len, batch_size)
    logger.info("done: %d steps, train loss %.4f, held-out loss %.4f", steps, train_loss, heldout)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.with_name(f".{output_dir.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    results = {"steps": steps, "train_loss": train_loss, "heldout_loss": heldout}
    (tmp_dir / "recipe.json").write_text(json.dumps({**recipe, **results}, indent=2) + "\n")
    _publish(tmp_dir, output_dir)
    return output_dir


@click.command()
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Model directory to write.")
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help=f"Hugging Face tokenizer directory (e.g. {DEFAULT_TOKENIZER}). Default: a {DEMO_VOCAB}-token BPE trained on "
    "the corpus.",
)
@click.option("--max-seconds", type=float, default=None,
              help="Training time budget. Default: none with --max-steps, else 240 s.")
@click.option("--max-steps", type=int, default=None,
              help="Training step budget: the same teacher on any machine, however busy (default: time-bound only).")
def main(output: Path, tokenizer: Path | None, max_seconds: float | None, max_steps: int | None) -> None:
    """Train a small Llama teacher on a local corpus (built into OUTPUT/corpus if missing) and save it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if max_seconds is None and max_steps is None:
        max_seconds = 240
    with logging_redirect_tqdm():
        build_demo_teacher(output, tokenizer_dir=tokenizer, max_seconds=max_seconds, max_steps=max_steps)


if __name__ == "__main__":
    main()
