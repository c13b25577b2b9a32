"""Cross-tokenizer distillation: a student with the Llama-2 tokenizer trained from a SmolLM2-135M-Instruct store,
against CE on the same text and a student with the teacher's own tokenizer.

Flow (every step cached under --dir/cross-tokenizer):
1. Shakespeare paragraphs (`../shared/data/tinyshakespeare.txt`): the first --train-paragraphs to train on, the last
   --heldout-paragraphs held out (disjoint);
2. `teacher-cache build` with SmolLM2-135M-Instruct (49k byte-level BPE) over the training paragraphs;
3. two random-init students of one architecture, one with the Llama-2 32k sentencepiece tokenizer, one with the
   teacher's, each trained by `student-train` for the same steps, batch, learning rate and seed, so on the same
   text (every row reads the same store samples in the same order):
   - Llama-2 tokenizer, through the character alignment: CE alone; `chunks` (approximate likelihood matching), with
     the default mix (forward_kl 0.9, ce 0.1) and beside CE at full weight; `mapped` top-k; `sorted` (ULD, with CE
     as in its paper);
   - the teacher's tokenizer (the reference): CE alone; sparse KD over the stored top-k + tail;
4. every student, and the teacher, scored on the held-out paragraphs in bits per character: each paragraph after
   the tokenizer's end-of-text token, as the students saw documents in training, its summed negative log-likelihood
   over its characters, in bits; tokenizers with more or fewer tokens per character compare;
5. the alignment on the training samples: the share of characters in one-to-one chunks, tokens per chunk on each
   side, the share of the student's trained positions with mapped targets and of the characters the chunk loss
   covers, and the share of the teacher's top-k mass that maps to student tokens.

    python benchmarks/cross_tokenizer.py --dir .demo

Writes DIR/cross-tokenizer/cross_tokenizer.{json,md} (cross_tokenizer-seedS.* for --seed S other than 0); rerun
with the same options to reuse every finished step. `--seed 1 --rows "mapped top-k"` adds a second seed of one row
and its CE baseline.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine_info import machine  # noqa: E402
from storage.alignment import align, student_tokens, teacher_text  # noqa: E402
from storage.reader import Store  # noqa: E402
from student_train.cross_tokenizer import CrossTokenizer  # noqa: E402
from student_train.loader import LoaderConfig, StoreLoader  # noqa: E402
from tools.demo_chat import Steps, cli, reuse, sha256  # noqa: E402
from tools.smollm2 import build_smollm2  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE, LLAMA2 = DATA / "tinyshakespeare.txt", DATA / "llama2-tokenizer"
SEQ_LEN = 256
ROWS = {  # row -> (the student's tokenizer: "llama2" or "teacher", student-train options)
    "CE": ("llama2", ["--loss", "ce=1"]),
    "chunks (ALM)": ("llama2", ["--targets-from", "chunks"]),
    "chunks (ALM) + CE": ("llama2", ["--targets-from", "chunks", "--loss", "forward_kl=1", "--loss", "ce=1"]),
    "mapped top-k": ("llama2", ["--targets-from", "mapped"]),
    "sorted (ULD) + CE": ("llama2", ["--targets-from", "sorted", "--loss", "tv=1", "--loss", "ce=1"]),
    "same tokenizer: CE": ("teacher", ["--loss", "ce=1"]),
    "same tokenizer: top-k KD": ("teacher", ["--targets-from", "topk_tail"]),
}


def paragraphs(train: int, heldout: int) -> tuple[list[str], list[str]]:
    """The first `train` and the last `heldout` paragraphs of Shakespeare."""
    found = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    if train + heldout > len(found):
        raise click.BadParameter(f"{train} + {heldout} paragraphs asked, the text has {len(found)}.")
    return found[:train], found[-heldout:]


def student_config(path: Path, tokenizer_dir: Path, *, width: int, layers: int) -> Path:
    """A random-init Llama student of `width` and `layers` with the tokenizer of `tokenizer_dir`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=width * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
                         max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if not reuse(path, [config.to_json_string(), str(tokenizer_dir)]) or not (path / "config.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


@torch.inference_mode()
def bits_per_char(model_dir: Path, texts: list[str]) -> float:
    """Held-out bits per character: each text after the tokenizer's end-of-text token, its summed negative
    log-likelihood (nats) over its characters, in bits."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nats = chars = 0.0
    for text in texts:
        ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]][:2 * SEQ_LEN]
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        chars += len(tokenizer.decode(ids[1:], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return nats / chars / math.log(2)


def coverage(store: Path, teacher, student) -> dict:
    """How the Llama-2 tokenization aligns with the teacher's on the training samples (module docstring)."""
    cross = CrossTokenizer(teacher, student, Store(store).manifest.teacher["vocab_size"])
    one_to_one = characters = teacher_tokens = student_tokens_ = chunks = 0.0
    trained = aligned = chunk_chars = all_chars = mass = mapped_mass = 0.0
    loader = StoreLoader(LoaderConfig(store=str(store), batch_size=8, shuffle=False, drop_last=False, verify=False))
    for batch in loader:
        out = cross(batch)
        for b in range(len(batch["input_ids"])):
            ids = batch["input_ids"][b][batch["attention_mask"][b]].numpy()
            spans = teacher_text(teacher, ids)
            found = align(spans, student_tokens(student, spans.text, breaks=spans.breaks)).coverage()
            one_to_one += found.one_to_one * found.characters
            characters += found.characters
            teacher_tokens += found.teacher_tokens_per_chunk * found.chunks
            student_tokens_ += found.student_tokens_per_chunk * found.chunks
            chunks += found.chunks
        mask = out["loss_mask"]
        trained += float(mask.sum())
        aligned += float(out["kd_mask"].sum())
        all_chars += float(out["chars"][mask].sum())
        chunk_chars += float(out["chars"][mask & (out["chunk_ids"] >= 0)].sum())
        probs = out["topk_logprobs"][out["kd_mask"]].exp()
        mass += float(probs.sum())
        mapped_mass += float(probs[out["topk_ids"][out["kd_mask"]] >= 0].sum())
    return {"one_to_one_chars": one_to_one / characters, "teacher_tokens_per_chunk": teacher_tokens / chunks,
            "student_tokens_per_chunk": student_tokens_ / chunks, "aligned_positions": aligned / trained,
            "chunk_loss_chars": chunk_chars / all_chars, "mapped_topk_mass": mapped_mass / mass,
            "teacher_ids_mapped": cross.mapped_share}


@click.command()
@click.option("--dir", "root", type=click.Path(path_type=Path), default=Path(".demo"), show_default=True)
@click.option("--train-paragraphs", type=click.IntRange(min=1), default=1600, show_default=True)
@click.option("--heldout-paragraphs", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--width", type=click.IntRange(min=64), default=256, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--steps", "train_steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every student's init and data order; runs of another seed than 0 get their own folders.")
@click.option("--rows", "only", default=",".join(ROWS), show_default=True,
              help="Comma-separated rows to train (of ROWS); each tokenizer's CE row always runs, as the baseline.")
def main(root: Path, train_paragraphs: int, heldout_paragraphs: int, width: int, layers: int, train_steps: int,
         batch_size: int, lr: float, seed: int, only: str) -> None:
    """Cross-tokenizer students of SmolLM2-135M-Instruct, in bits per character (see the module docstring)."""
    wanted = [row.strip() for row in only.split(",") if row.strip()]
    if unknown := sorted(set(wanted) - set(ROWS)):
        raise click.BadParameter(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}.", param_hint="--rows")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    steps, out = Steps(), root / "cross-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = root / "smollm2"
    build_smollm2(teacher_dir)
    train_texts, heldout_texts = paragraphs(train_paragraphs, heldout_paragraphs)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in train_texts))
    store = out / "store"
    if not (reuse(store, [sha256(data), SEQ_LEN, str(teacher_dir)]) and (store / "manifest.json").exists()
            and Store(store).manifest.complete):
        build_start = time.perf_counter()
        steps.run(cli("teacher-cache"), "build", "--model", str(teacher_dir), "--dataset", str(data), "--output",
                  str(store), "--seq-len", str(SEQ_LEN), "--batch-size", "4", "--dtype", "float32")
        (out / ".build.seconds").write_text(str(time.perf_counter() - build_start))
    tokenizers = {"llama2": LLAMA2, "teacher": teacher_dir}
    students = {name: student_config(out / f"student-{name}", path, width=width, layers=layers)
                for name, path in tokenizers.items()}
    options = ["--batch-size", str(batch_size), "--max-steps", str(train_steps), "--lr", str(lr), "--seed",
               str(seed), "--eval-fraction", "0.05", "--eval-every", str(train_steps), "--save-every",
               str(train_steps), "--warmup-steps", str(train_steps // 10)]
    rows = []
    for row, (tokenizer, flags) in ROWS.items():
        if row not in wanted and flags != ["--loss", "ce=1"]:
            continue
        name = "run-" + "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-")
        run = out / (name if seed == 0 else f"{name}-seed{seed}")
        timing = run.with_name(f".{run.name}.seconds")
        if not (reuse(run, [sha256(store / "manifest.json"), flags, options, width, layers])
                and (run / "final_metrics.json").exists() and timing.exists()):
            start = time.perf_counter()
            steps.run(cli("student-train"), "--store", str(store), "--student", str(students[tokenizer]),
                      "--output", str(run), *flags, *options)
            timing.write_text(str(time.perf_counter() - start))
        final = json.loads((run / "final_metrics.json").read_text())
        rows.append({"row": row, "tokenizer": tokenizer, "flags": flags, "train_seconds": float(timing.read_text()),
                     "heldout_bits_per_char": bits_per_char(run, heldout_texts), "final_metrics": final})
    for row in rows:
        ce = next(r for r in rows if r["tokenizer"] == row["tokenizer"] and r["flags"] == ["--loss", "ce=1"])
        row["time_vs_ce"] = row["train_seconds"] / ce["train_seconds"]
    manifest = Store(store).manifest
    result = {
        "machine": machine(torch.device("cpu")), "teacher": str(teacher_dir), "seq_len": SEQ_LEN,
        "train_paragraphs": train_paragraphs, "heldout_paragraphs": heldout_paragraphs,
        "heldout_chars": sum(map(len, heldout_texts)), "store_tokens": manifest.num_tokens,
        "student": {"width": width, "layers": layers, "steps": train_steps, "batch_size": batch_size, "lr": lr,
                    "seed": seed},
        "teacher_bits_per_char": bits_per_char(teacher_dir, heldout_texts),
        "alignment": coverage(store, AutoTokenizer.from_pretrained(teacher_dir),
                              AutoTokenizer.from_pretrained(LLAMA2)),
        "rows": rows,
    }
    report = out / ("cross_tokenizer" if seed == 0 else f"cross_tokenizer-seed{seed}")
    report.with_suffix(".json").write_text(json.dumps(result, indent=2))
    report.with_suffix(".md").write_text(table(result))
    click.echo(table(result))


def table(result: dict) -> str:
    a = result["alignment"]
    lines = [f"teacher SmolLM2-135M-Instruct: {result['teacher_bits_per_char']:.3f} bits/char on "
             f"{result['heldout_chars']:,} held-out characters; store of {result['store_tokens']:,} teacher tokens",
             "", "| student tokenizer | loss | held-out bits/char | train s | time vs CE |", "|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        name = "Llama-2 32k (sentencepiece)" if r["tokenizer"] == "llama2" else "teacher's 49k (byte-level BPE)"
        lines.append(f"| {name} | {r['row']} | {r['heldout_bits_per_char']:.3f} | {r['train_seconds']:.0f} | "
                     f"{r['time_vs_ce']:.2f}x |")
    lines += ["", f"alignment on the training samples: {a['one_to_one_chars']:.1%} of characters in one-to-one "
              f"chunks; {a['teacher_tokens_per_chunk']:.2f} teacher and {a['student_tokens_per_chunk']:.2f} student "
              f"tokens per chunk; chunk loss over {a['chunk_loss_chars']:.1%} of the trained characters; mapped "
              f"targets at {a['aligned_positions']:.1%} of the student's trained positions, holding "
              f"{a['mapped_topk_mass']:.1%} of the teacher's top-k mass there; {a['teacher_ids_mapped']:.1%} of the "
              "teacher's ids have a Llama-2 token of the same bytes"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
