"""Train step: time and peak memory of CE, cached KD (each target kind) and online full-logit KD, as ratios to CE;
with `--loss-impl fused,checkpoint`, the fused loss against the checkpointed one.

What it checks: training from the cache costs about what cross-entropy costs (the student's logits exist one chunk
of positions at a time, the targets are a few ids per position), while online KD pays for a teacher forward every
step and holds the teacher's weights. Variants, all on the same batches of text, the same student and optimizer:
  - ce: `student-train --loss ce=1` (chunked CE; on CUDA with liger-kernel installed, its fused CE, as users get);
  - topk_tail, topk_renorm, sampled: `--loss forward_kl=0.9,ce=0.1 --targets-from KIND`;
  - hybrid: the same loss on hybrid targets (the exact top-64 + 50 draws from the tail), read from a second store
    built over the same text (`--targets hybrid`), so its batches hold the same tokens as the others';
  - online: forward KL (0.9) + CE (0.1) against the teacher run in the same process: the teacher, loaded from its
    directory, runs under no_grad to its final hidden states; then a chunk of positions at a time, its head gives
    that chunk's log-probs over the whole vocabulary and the student's head its log-probs, and the chunk's loss is
    backpropagated at once into the student's hidden states (so one chunk's [chunk, vocab] logits exist at a time
    and nothing is recomputed); one backward through the student body follows. Same clipping, AdamW and schedule.
The cached variants run `student-train`'s own step (`Trainer._train_step`: forward, `distillation_loss`, backward,
clipping, AdamW) on batches of `student-train`'s loader; the online one is written here on the same trainer.
ce and the cached variants run once per `--loss-impl` (`student-train --loss-impl`: fused, the default, computes each
chunk's logits once and builds their gradient in forward; checkpoint recomputes them in backward), each row against
the CE of its own loss implementation ("vs CE"), and a checkpoint row also against the fused row of its kind ("vs
fused"): `--loss-impl fused,checkpoint` shows both ratios to CE, and the fused path's speed-up, in one run.

Time: one subprocess builds every variant (each its own trainer, same initial student; the teacher for online),
takes one warm-up step with each (its loss is the loss at step 0, reported), then `--steps` rounds of one step of
each variant, the order reversed every other round. ms/step is the median step; a ratio is the median over rounds of
the ratio within the round, so that the load of a shared machine, which changes from minute to minute, weighs on
both sides alike (every step's time is in the JSON). On CPU the process's CPU time per step is reported beside it,
less sensitive to other jobs than wall time (`online / this` and the targets use wall time).

Memory: a fresh subprocess per variant, a warm-up step, then one measured step. It counts everything the training
holds (student, gradients, AdamW state, batches, the teacher for online) at the peak of that step: on CUDA
torch.cuda.max_memory_allocated (bf16 autocast, as `student-train` uses there; the online teacher in bf16); on CPU
the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set of the process before
anything was built, with glibc told to return freed blocks of 64 KiB or more to the OS (MALLOC_MMAP_THRESHOLD_, in
these subprocesses only) so that resident memory follows live tensors. "step" is the part of the peak above what was
held before the step.

Without --teacher, a random Llama teacher is built from a config (width 1024, 8 layers, 168M parameters, 3.7x the
default student; its head scaled so its distributions are as peaked as a trained model's, about 17 distinct ids in 50
draws) with the Llama-2 tokenizer, and its store is built by `teacher-cache build` over Shakespeare (top-64 + tail,
50 draws; with the hybrid variant, a second store of top-64 + 50 tail draws). The student is a random Llama from a
config with the teacher's vocabulary. Defaults take about 5 minutes on 2 CPU cores; `--device cuda --batch 8
--seq 2048 --hidden 1024 --layers 12 --teacher-hidden 2048 --teacher-layers 24` is a GPU size.

    python benchmarks/train_step.py [--vocab 32000] [--batch 4] [--seq 512] [--hidden 512] [--layers 4] \\
        [--teacher-hidden 1024] [--teacher-layers 8 | --teacher DIR] [--chunk 256] [--temperature 1] [--steps 3] \\
        [--device auto] \\
        [--only ce,topk_tail,topk_renorm,sampled,hybrid,online] [--loss-impl fused,checkpoint] [--workdir DIR] \\
        [--json OUT]

train_memory.py measures the memory of one step for every divergence of the loss menu; this script compares the
whole step (optimizer included) of the target kinds with CE and with online KD, in time and memory.
The JSON goes to benchmarks/results/train_step.json unless --json says otherwise.

Legend: B batch, L positions, H hidden size, V vocabulary, P trained positions, C positions in a chunk.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine_info import machine  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("ce", "topk_tail", "topk_renorm", "sampled", "hybrid", "online")
CACHED = ("topk_tail", "topk_renorm", "sampled", "hybrid")
HYBRID_TOP_K, HYBRID_DRAWS = 64, 50  # the hybrid store: the exact top-64 + 50 draws from the tail outside it
KD, CE = 0.9, 0.1  # the mix of every KD variant: forward_kl=0.9, ce=0.1
LOSS_IMPLS = ("fused", "checkpoint")  # `student-train --loss-impl`; a run's names are KIND@IMPL, and online
SHARPEN = 8.0  # factor on a random teacher's head: entropy about 2.7 nats, ~17 distinct ids in 50 draws


# --- setup, in the parent process -----------------------------------------------------------------------------------


def random_teacher(path: Path, vocab: int, hidden: int, layers: int, seq: int) -> None:
    """A Llama with random weights (head sharpened) and the Llama-2 tokenizer, saved to `path`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab, hidden, layers, seq))
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(DATA / "llama2-tokenizer").save_pretrained(path)


def llama_config(vocab: int, hidden: int, layers: int, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       max_position_embeddings=seq, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def prepare(workdir: Path, options: dict, hybrid: bool) -> dict[str, str]:
    """Teacher, student config and store in `workdir`, and with `hybrid` the hybrid store over the same text (each
    reused when present); their paths (`variant_paths`)."""
    from transformers import AutoConfig, AutoTokenizer

    from teacher_cache import BuildConfig, build_cache

    teacher = options["teacher"] or str(workdir / "teacher")
    if not options["teacher"] and not (workdir / "teacher" / "config.json").exists():
        click.echo(f"building a random teacher in {teacher} ...")
        random_teacher(Path(teacher), options["vocab"], options["teacher_hidden"], options["teacher_layers"],
                       options["seq"])
    student = workdir / "student"
    if not (student / "config.json").exists():
        vocab = AutoConfig.from_pretrained(teacher).vocab_size
        llama_config(vocab, options["hidden"], options["layers"], options["seq"]).save_pretrained(student)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(student)
    paths = variant_paths(workdir, options)
    stores = {"store": {}, "hybrid_store": {"targets": ("hybrid",), "top_k": HYBRID_TOP_K,
                                            "num_draws": HYBRID_DRAWS}}
    for key, targets in stores.items():
        store = Path(paths[key])
        if (key == "hybrid_store" and not hybrid) or (store / "manifest.json").exists():
            continue
        samples = options["batch"] * (options["steps"] + 1)
        click.echo(f"building the store {store} ({samples} samples of {options['seq']} tokens) ...")
        build_cache(BuildConfig(model=teacher, dataset=options["dataset"], output=str(store), seq_len=options["seq"],
                                max_samples=samples, batch_size=options["batch"], device=options["device"],
                                **targets))
    return paths


def variant_paths(workdir: Path, options: dict) -> dict[str, str]:
    """The teacher, student and stores of a run in `workdir`."""
    return {"teacher": options["teacher"] or str(workdir / "teacher"), "student": str(workdir / "student"),
            "store": str(workdir / "store"), "hybrid_store": str(workdir / "store-hybrid")}


def store_of(name: str) -> str:
    """The key of `variant_paths` whose store variant `name` (KIND@IMPL, or online) reads."""
    return "hybrid_store" if name.partition("@")[0] == "hybrid" else "store"


# --- one variant, in a fresh subprocess -----------------------------------------------------------------------------


def online_step(trainer, teacher, batch: dict, chunk: int) -> float:
    """One online-KD step: forward KL to the teacher over the whole vocabulary (KD) + CE (CE); returns the loss."""
    device, model = trainer.device, trainer.model
    model.train()
    ids_BL1, attention_BL = batch["input_ids"].to(device), batch["attention_mask"][:, :-1].to(device).long()
    mask_BL = batch["loss_mask"].to(device)
    true_P = ids_BL1[:, 1:][mask_BL]
    with torch.no_grad(), trainer.autocast():
        teacher_PH = teacher.model(input_ids=ids_BL1[:, :-1], attention_mask=attention_BL).last_hidden_state[mask_BL]
    with trainer.autocast():
        hidden_BLH = model.model(input_ids=ids_BL1[:, :-1], attention_mask=attention_BL).last_hidden_state
    hidden_PH = hidden_BLH[mask_BL]
    leaf_PH = hidden_PH.detach().requires_grad_()  # each chunk's gradient lands here; one body backward at the end
    positions = max(len(leaf_PH), 1)
    total = 0.0
    for start in range(0, len(leaf_PH), chunk):
        part = slice(start, start + chunk)
        with torch.no_grad(), trainer.autocast():
            teacher_CV = F.log_softmax(teacher.lm_head(teacher_PH[part]).float(), -1)
        # The student's head as in `distillation_loss`: outside autocast, everything after it in fp32.
        student_CV = F.log_softmax(trainer.head(leaf_PH[part]).float(), -1)
        kl = (teacher_CV.exp() * (teacher_CV - student_CV)).sum()
        ce = -student_CV.gather(-1, true_P[part, None]).sum()
        loss = (KD * kl + CE * ce) / positions
        loss.backward()
        total += loss.item()
    hidden_PH.backward(leaf_PH.grad)
    if trainer.config.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.config.clip_grad)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return total


def build_variant(name: str, paths: dict[str, str], options: dict):
    """(trainer, step) of variant `name` (KIND@IMPL, or online): step(batch) trains one step and returns its loss."""
    from transformers import AutoModelForCausalLM

    from student_train.config import TrainConfig
    from student_train.train import Trainer

    device = torch.device(options["device"])
    kind, _, impl = name.partition("@")
    loss = ["ce=1"] if kind == "ce" else [f"forward_kl={KD}", f"ce={CE}"]
    store = paths[store_of(name)]
    with tempfile.TemporaryDirectory(prefix="train-step-") as scratch:  # nothing is written before `run`
        trainer = Trainer(TrainConfig(
            store=store, student=paths["student"], output=scratch, batch_size=options["batch"], loss=loss,
            targets_from=kind if kind in CACHED else None, chunk_positions=options["chunk"], device=str(device),
            temperature=options["temperature"] if kind in CACHED else 1.0,
            eval_store=store, loss_impl=impl or "fused"))
    if name != "online":
        return trainer, lambda batch: trainer._train_step(iter([batch]))["loss"]  # `Trainer.run`'s step, unlogged
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=dtype).to(device).eval()
    teacher.requires_grad_(False)
    trainer.teacher_parameters = teacher.num_parameters()
    return trainer, lambda batch: online_step(trainer, teacher, batch, options["chunk"])


def store_batches(store: str, options: dict) -> list[dict]:
    """The first `steps` + 1 batches of `student-train`'s loader over a store, in store order."""
    from student_train.loader import LoaderConfig, StoreLoader

    loader = StoreLoader(LoaderConfig(store=store, batch_size=options["batch"], shuffle=False))
    return list(itertools.islice(loader, options["steps"] + 1))


def measure_times(names: list[str], paths: dict[str, str], options: dict) -> dict[str, dict]:
    """Every variant in one process: a warm-up step each (the loss at step 0), then `steps` rounds of one step of
    each, the order reversed every other round, so that a shared machine's load weighs on all alike."""
    sync = torch.cuda.synchronize if options["device"].startswith("cuda") else lambda: None
    batches = {key: store_batches(paths[key], options) for key in dict.fromkeys(map(store_of, names))}
    variants = {name: build_variant(name, paths, options) for name in names}
    out = {name: {"first_loss": step(batches[store_of(name)][0]), "step_s": [], "cpu_s": []}
           for name, (_, step) in variants.items()}
    for round_ in range(options["steps"]):
        index = 1 + round_ % (len(batches["store"]) - 1)  # the same batch of text for every variant in a round
        for name in names if round_ % 2 == 0 else names[::-1]:
            sync()
            began, began_cpu = time.perf_counter(), time.process_time()
            variants[name][1](batches[store_of(name)][index])
            sync()
            out[name]["step_s"].append(time.perf_counter() - began)
            out[name]["cpu_s"].append(time.process_time() - began_cpu)
    for name, (trainer, _) in variants.items():
        out[name] |= {"tokens_per_step": int(batches["store"][1]["loss_mask"].sum()),
                      "student_parameters": trainer.model.num_parameters(),
                      "teacher_parameters": getattr(trainer, "teacher_parameters", None)}
    return out


def measure_memory(name: str, paths: dict[str, str], options: dict) -> dict:
    """Memory of variant `name` alone in this process: held before a step and at the peak of one (after a warm-up)."""
    device = torch.device(options["device"])
    base = 0 if device.type == "cuda" else _status_bytes("VmRSS")
    batches = store_batches(paths[store_of(name)], options)[:2]
    _, step = build_variant(name, paths, options)
    step(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batches[1])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        held = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        step(batches[1])
        peak = _status_bytes("VmHWM")
    return {"held_mib": (held - base) / 2**20, "peak_mib": (peak - base) / 2**20, "step_mib": (peak - held) / 2**20}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# --- the report -----------------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """ms/step (the median step) and each row against the CE of its loss implementation (online: the first), and a
    checkpoint row against the fused row of its kind; time ratios are medians of the ratios within a round."""
    def paired(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b, strict=True))

    ces = {row["loss_impl"]: row for row in rows if row["variant"] == "ce"}
    fused = {row["variant"]: row for row in rows if row["loss_impl"] == "fused"}
    online = next((row for row in rows if row["variant"] == "online"), None)
    for row in rows:
        ce = ces.get(row["loss_impl"], next(iter(ces.values())))
        row["ms_per_step"] = 1000 * statistics.median(row["step_s"])
        row["ms_per_step_vs_ce"] = paired(row["step_s"], ce["step_s"])
        row["cpu_ms_per_step"] = 1000 * statistics.median(row["cpu_s"])
        row["cpu_ms_per_step_vs_ce"] = paired(row["cpu_s"], ce["cpu_s"])
        for key in ("peak_mib", "step_mib"):
            row[f"{key}_vs_ce"] = row[key] / ce[key]
        reference = fused.get(row["variant"]) if row["loss_impl"] not in (None, "fused") else None
        row["ms_per_step_vs_fused"] = paired(row["step_s"], reference["step_s"]) if reference else None
        row["cpu_ms_per_step_vs_fused"] = paired(row["cpu_s"], reference["cpu_s"]) if reference else None
        row["online_time_vs_this"] = paired(online["step_s"], row["step_s"]) if online else None
        row["online_cpu_time_vs_this"] = paired(online["cpu_s"], row["cpu_s"]) if online else None


def verdicts(rows: list[dict]) -> dict[str, bool]:
    """The issue's targets, for each loss implementation: cached KD <= 1.10x CE in time and peak memory; online KD
    >= 2x a cached step's time."""
    out = {}
    for impl in dict.fromkeys(row["loss_impl"] for row in rows if row["variant"] in CACHED):
        cached = [row for row in rows if row["variant"] in CACHED and row["loss_impl"] == impl]
        out[f"cached time <= 1.10x ce ({impl})"] = all(r["ms_per_step_vs_ce"] <= 1.10 for r in cached)
        out[f"cached peak memory <= 1.10x ce ({impl})"] = all(r["peak_mib_vs_ce"] <= 1.10 for r in cached)
        if any(row["variant"] == "online" for row in rows):
            out[f"online time >= 2x cached ({impl})"] = all(r["online_time_vs_this"] >= 2.0 for r in cached)
    return out


def print_table(result: dict) -> None:
    info, opts, rows = result["machine"], result["options"], result["rows"]
    click.echo(f"\n{info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}; torch {info['torch']}; 1-min load "
               "average {:.1f} at the start, {:.1f} at the end".format(*info["load_average"]))
    student = rows[0]["student_parameters"] / 1e6
    teacher = next((r["teacher_parameters"] / 1e6 for r in rows if r["teacher_parameters"]), None)
    shape = f"random, width {opts['teacher_hidden']}, {opts['teacher_layers']} layers"
    teacher_text = (opts["teacher"] or shape) + (f" ({teacher:.1f}M)" if teacher else "")
    click.echo(f"student {student:.1f}M parameters (width {opts['hidden']}, {opts['layers']} layers), teacher "
               f"{teacher_text}; vocab {result['vocab_size']}; batch {opts['batch']} x {opts['seq']}, "
               f"{rows[0]['tokens_per_step']} trained tokens per step; chunks of {opts['chunk']}; KD at T = "
               f"{opts.get('temperature', 1.0):g}; {opts['device']}; "
               f"median of {opts['steps']} interleaved rounds; memory of one step, each variant alone\n")
    cpu = opts["device"] == "cpu"  # on CUDA the process's CPU time is the host's, not the step's
    click.echo("| variant | loss | loss at step 0 | ms/step | vs CE | vs fused |"
               + (" CPU ms/step | vs CE | vs fused |" if cpu else "")
               + " peak MiB | vs CE | step MiB | vs CE | online / this |")
    click.echo("|---|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if cpu else "") + "---:|---:|---:|---:|---:|")

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value else "-"

    for row in rows:
        cpu_cells = (f" {row['cpu_ms_per_step']:,.0f} | {ratio(row['cpu_ms_per_step_vs_ce'])} | "
                     f"{ratio(row['cpu_ms_per_step_vs_fused'])} |") if cpu else ""
        click.echo(f"| {row['variant']} | {row['loss_impl'] or '-'} | {row['first_loss']:.3f} | "
                   f"{row['ms_per_step']:,.0f} | {ratio(row['ms_per_step_vs_ce'])} | "
                   f"{ratio(row['ms_per_step_vs_fused'])} |{cpu_cells} {row['peak_mib']:,.0f} | "
                   f"{row['peak_mib_vs_ce']:.2f}x | {row['step_mib']:,.0f} | {row['step_mib_vs_ce']:.2f}x | "
                   f"{ratio(row['online_time_vs_this'])} |")
    click.echo("\n" + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in result["targets"].items()))


@click.command()
@click.option("--vocab", type=int, default=32000, show_default=True, help="Vocabulary of the random teacher (>= "
              "32000, the Llama-2 tokenizer's).")
@click.option("--batch", type=int, default=4, show_default=True)
@click.option("--seq", type=int, default=512, show_default=True)
@click.option("--hidden", type=int, default=512, show_default=True, help="Student width (heads of 64).")
@click.option("--layers", type=int, default=4, show_default=True, help="Student layers.")
@click.option("--teacher-hidden", type=int, default=1024, show_default=True, help="Random teacher width.")
@click.option("--teacher-layers", type=int, default=8, show_default=True, help="Random teacher layers.")
@click.option("--teacher", help="Teacher model directory instead of a random one (its tokenizer and vocabulary).")
@click.option("--chunk", type=int, default=256, show_default=True, help="Positions per loss chunk.")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="The KD temperature of the cached variants (`student-train --temperature`): topk_tail and "
                   "topk_renorm only, as sampled and hybrid targets are draws at T = 1 (CE stays at T = 1).")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per variant (after a warm-up).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu or cuda.")
@click.option("--dataset", default=str(DATA / "tinyshakespeare.txt"), show_default=True, help="Text of the store.")
@click.option("--only", help=f"Comma-separated variants of {','.join(VARIANTS)} (ce is always measured).")
@click.option("--loss-impl", "loss_impls", default="fused", show_default=True,
              help=f"Comma-separated `student-train --loss-impl` choices ({','.join(LOSS_IMPLS)}) to run ce and the "
                   "cached variants with, each against the CE of its own choice; fused,checkpoint compares them.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the teacher, student and store here and reuse "
              "them in later runs with the same sizes. Default: a temporary directory.")
@click.option("--json", "json_path", default=str(RESULTS / "train_step.json"), show_default=True)
@click.option("--child", hidden=True, help="Measure this one variant and print it as JSON.")
def main(only: str | None, loss_impls: str, workdir: str | None, json_path: str, child: str | None,
         **options) -> None:
    """Print ms/step and peak memory of CE, cached KD of each target kind and online KD, as ratios to CE."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from storage.causal_lm import resolve_device

    options["device"] = str(resolve_device(options["device"]))
    if child:
        paths = variant_paths(Path(workdir), options)
        names = child.split(":", 1)[1].split(",")
        out = measure_times(names, paths, options) if child.startswith("times:") else measure_memory(names[0], paths,
                                                                                                     options)
        click.echo(json.dumps(out))
        return
    if not options["teacher"] and options["vocab"] < 32000:
        raise click.BadParameter("the random teacher uses the Llama-2 tokenizer: at least 32000.", param_hint="--vocab")
    kinds = list(VARIANTS) if not only else ["ce", *[n for n in only.split(",") if n and n != "ce"]]
    unknown = [n for n in kinds if n not in VARIANTS]
    if unknown:
        raise click.BadParameter(f"{unknown}: choose from {', '.join(VARIANTS)}.", param_hint="--only")
    at_one = [n for n in kinds if n in ("sampled", "hybrid", "online")]
    if options["temperature"] != 1.0 and at_one:
        raise click.BadParameter(f"{', '.join(at_one)} run at T = 1 only (draws at T = 1; online is measured at "
                                 "T = 1 here): choose --only among topk_tail,topk_renorm.", param_hint="--temperature")
    impls = [impl for impl in loss_impls.split(",") if impl]
    if not impls or any(impl not in LOSS_IMPLS for impl in impls):
        raise click.BadParameter(f"{loss_impls!r}: choose from {', '.join(LOSS_IMPLS)}.", param_hint="--loss-impl")
    # Each loss implementation's variants together, then online (which computes its loss itself).
    names = [f"{kind}@{impl}" for impl in impls for kind in kinds if kind != "online"] + (
        ["online"] if "online" in kinds else [])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="train-step-") as scratch:
        work = Path(workdir or scratch)
        paths = prepare(work, options, hybrid="hybrid" in kinds)
        argv = [f"--{key.replace('_', '-')}={value}" for key, value in options.items() if value is not None]
        def child_run(what: str) -> dict:
            # Memory only: freed blocks of 64 KiB or more go back to the OS, so that the resident set follows live
            # tensors. Timing keeps glibc's defaults, what training runs with (mapping and unmapping every large
            # temporary costs page faults).
            env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "65536"} if what.startswith("memory:") else {})
            out = subprocess.run([sys.executable, __file__, *argv, f"--workdir={work}", "--child", what], env=env,
                                 check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        click.echo(f"timing {', '.join(names)}, {options['steps']} rounds ...")
        times = child_run("times:" + ",".join(names))
        rows = []
        for name in names:
            click.echo(f"measuring the memory of {name} ...")
            kind, _, impl = name.partition("@")
            rows.append({"variant": kind, "loss_impl": impl or None, **times[name], **child_run(f"memory:{name}")})
        from storage.reader import Store

        vocab = Store(paths["store"]).manifest.teacher["vocab_size"]
    add_ratios(rows)
    result = {"machine": machine(torch.device(options["device"])) | {"load_average": [load_before, os.getloadavg()[0]]},
              "options": options | {"variants": list(kinds), "loss_impls": impls}, "vocab_size": vocab, "rows": rows,
              "targets": verdicts(rows)}
    print_table(result)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
