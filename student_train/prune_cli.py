"""`student-init`: a smaller student made from the teacher by structured pruning, before `student-train`.

The seed recipe, in this order:
1. layers: those of --keep-layers, or --layers N of them: evenly spaced from layer 0 (half of them: every other
   one, as DistilBERT), or with --layer-importance the N whose removal alone raises the calibration loss most;
   `student_train.init_student.select_layers` builds the model of the kept blocks.
2. attention heads (--heads) by Taylor importance (gradient x activation) and FFN channels (--ffn) by activation
   magnitude, both measured on the model of step 1 (`student_train.prune_importance`) and cut by `student_train.prune`.
Importance is measured on a calibration slice of a store (--store) built with the teacher's tokenizer.

The output is a standard HF model directory (weights, config, the teacher's tokenizer) that
`AutoModelForCausalLM.from_pretrained` loads, plus `student_init.json`: parameters before and after, the
compression ratio, what was kept and why (scores included), and the options. It is written under a temporary name
and renamed when complete. `student-train --student OUTPUT` trains it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.option_cli import click_options, load_config
from storage.options import option
from student_train.init_student import resolve_layers, select_layers
from student_train.prune import (
    Shape,
    check_head_count,
    choose_heads,
    find_family,
    head_counts,
    prune,
    shape_of,
    top_channels,
)
from student_train.prune_importance import block_importance, calibration_batches, head_and_channel_importance

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REPORT_NAME = "student_init.json"


class CountOrFraction(click.ParamType):
    """An integer (a count) or a decimal number (a fraction): 2 is two heads, 0.5 half of them."""

    name = "N|FRACTION"

    def convert(self, value, param, ctx):
        if isinstance(value, int | float):
            return value
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        self.fail(f"expected a count (2) or a fraction (0.5), got {value!r}.", param, ctx)


@dataclass(kw_only=True)
class StudentInitConfig:
    """Options of `student-init`: each field's help says what it does."""

    teacher: str = option(help="The teacher's local HF model directory (weights and tokenizer).")
    output: str = option(help=f"New directory of the student (absent or empty): an HF model with the teacher's "
                              f"tokenizer, and {REPORT_NAME} (the report).")
    keep_layers: list[int] | str | None = option(
        None, metavar="I,J,...",
        help="The teacher's layers to keep, e.g. 0,2,4 or 0,-1 (negative: from the end); in a file also a list. Not "
             "with --layers. Default: all, unless --layers.")
    layers: int | None = option(None, help="Keep N layers: evenly spaced from layer 0 (half of them: every other one), "
                                           "or the N most important with --layer-importance.")
    layer_importance: bool = option(False, help="Choose the --layers N layers by the rise of the calibration loss "
                                                "when each alone is skipped (needs --store).")
    heads: int | float | None = option(
        None, type=CountOrFraction(),
        help="Query heads kept per layer, by gradient x activation importance: a count (4) or a fraction (0.5) of "
             "the teacher's, taken to the nearest count grouped-query attention allows. Needs --store.")
    ffn: int | float | None = option(
        None, type=CountOrFraction(),
        help="FFN channels kept per layer, by mean activation magnitude: a count (1024) or a fraction (0.5). Needs "
             "--store.")
    store: str | None = option(None, help="A store of `teacher-cache build` with the teacher's tokenizer: the "
                                          "calibration data.")
    calibration_samples: int = option(64, help="Samples of --store, spread evenly over it, that measure importance.")
    batch_size: int = option(8, help="Calibration samples per forward.")
    device: str = option("auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        if isinstance(self.keep_layers, str):
            try:
                self.keep_layers = [int(part) for part in self.keep_layers.split(",")]
            except ValueError:
                raise ValueError(f"keep_layers: expected layer indices separated by commas (0,2,4 or 0,-1), got "
                                 f"{self.keep_layers!r}.") from None
        if self.keep_layers is not None and self.layers is not None:
            raise ValueError("keep_layers and layers both given: name the layers (--keep-layers) or how many to keep "
                             "(--layers), not both.")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers: expected at least 1 layer to keep, got {self.layers}.")
        if self.layer_importance and self.layers is None:
            raise ValueError("layer_importance: say how many layers to keep with layers (--layers N).")
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if value is not None and not _count_or_fraction(value):
                raise ValueError(f"{name}: expected a count (an integer >= 1) or a fraction in (0, 1] (e.g. 0.5), "
                                 f"got {value!r}.")
        by_importance = [name for name in ("layer_importance", "heads", "ffn") if getattr(self, name)]
        if by_importance and self.store is None:
            raise ValueError(f"{', '.join(by_importance)}: importance is measured on a calibration slice of a store; "
                             "pass one built with the teacher's tokenizer (--store STORE).")
        for name in ("calibration_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}.")
        if not (Path(self.teacher) / "config.json").is_file():
            raise ValueError(f"teacher: {self.teacher} is not an HF model directory (no config.json); pass the "
                             "teacher's local model directory.")
        output = Path(self.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"output: {self.output} exists and is not empty; choose a new directory.")

    @property
    def calibrated(self) -> bool:
        """Whether any choice is made by importance."""
        return bool(self.layer_importance or self.heads or self.ffn)


def _count_or_fraction(value) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0.0 < value <= 1.0)


def evenly_spaced(num_layers: int, keep: int) -> list[int]:
    """`keep` of `num_layers` layers, evenly spaced from layer 0: 0, 2, 4, ... for half of them."""
    return [i * num_layers // keep for i in range(keep)]


def prune_teacher(config: StudentInitConfig) -> dict:
    """Build the student of `config`, save it in `config.output` and return its report (see the module docstring).

    Raises:
        ValueError: bad options for this teacher (layers out of range, a head count grouped-query attention forbids,
            an architecture that cannot be pruned as asked, a store with another tokenizer).
    """
    device = config.device if config.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(config.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(config.teacher, dtype="auto").to(device).eval()
    num_layers = teacher.config.num_hidden_layers
    family = find_family(teacher) if config.heads or config.ffn else None
    shape = shape_of(teacher, family) if family else None
    if config.heads and family.no_heads:
        raise ValueError(f"heads: {family.no_heads}.")
    keep_heads = _head_count(config.heads, shape) if config.heads else None
    keep_channels = _width(config.ffn, shape.ffn_width) if config.ffn else None
    kept, method = _layers(config, num_layers)  # checked before the calibration passes
    batches = None
    if config.calibrated:
        batches = calibration_batches(config.store, config.calibration_samples, config.batch_size, tokenizer,
                                      teacher.get_output_embeddings().weight.shape[0], config.teacher)
    report = {"format_version": FORMAT_VERSION, "teacher": str(config.teacher), "architecture": type(teacher).__name__,
              "parameters": {"teacher": teacher.num_parameters()}}
    layer_scores = None
    if method == "importance":
        layer_scores = block_importance(teacher, batches)
        order = sorted(range(num_layers), key=lambda i: -layer_scores[i])  # stable: ties keep the lower layer
        kept = sorted(order[:config.layers])
    report["layers"] = {"method": method, "kept": kept, "teacher": num_layers, "importance": layer_scores}
    student = teacher if kept == list(range(num_layers)) else select_layers(teacher, kept)
    del teacher
    if family:
        student, report["heads"], report["ffn"] = _prune_heads_and_ffn(student, family, shape, batches, keep_heads,
                                                                       keep_channels)
    parameters = report["parameters"]
    parameters["student"] = student.num_parameters()
    parameters["compression_ratio"] = parameters["teacher"] / parameters["student"]
    report["calibration"] = None if batches is None else {
        "store": config.store, "samples": sum(len(batch["input_ids"]) for batch in batches),
        "trained_positions": sum(int(batch["loss_mask"].sum()) for batch in batches)}
    report["config"] = asdict(config)
    _save(student, tokenizer, report, Path(config.output))
    return report


def _head_count(heads: int | float, shape: Shape) -> int:
    """Query heads to keep: a count as given (checked), or the allowed count nearest a fraction (ties: more)."""
    if isinstance(heads, float):
        return min(head_counts(shape), key=lambda n: (abs(n - heads * shape.num_heads), -n))
    check_head_count(shape, heads)
    return heads


def _width(ffn: int | float, width: int) -> int:
    keep = max(1, round(ffn * width)) if isinstance(ffn, float) else ffn
    if keep > width:
        raise ValueError(f"ffn: cannot keep {keep} FFN channels, the teacher has {width}; keep at most {width}, or a "
                         "fraction.")
    return keep


def _layers(config: StudentInitConfig, num_layers: int) -> tuple[list[int], str]:
    """(layers to keep, how they were chosen); with "importance" the list is filled in later."""
    if config.keep_layers is not None:
        try:
            return resolve_layers(config.keep_layers, num_layers), "given"
        except ValueError as exc:
            raise ValueError(f"keep_layers: {exc}") from None
    if config.layers is None:
        return list(range(num_layers)), "all"
    if config.layers > num_layers:
        raise ValueError(f"layers: cannot keep {config.layers} layers, the teacher has {num_layers}.")
    if config.layer_importance:
        return [], "importance"
    return evenly_spaced(num_layers, config.layers), "evenly spaced"


def _prune_heads_and_ffn(model, family, shape: Shape, batches, keep_heads: int | None, keep_channels: int | None):
    """(pruned model, heads report or None, FFN report or None)."""
    scores = head_and_channel_importance(model, family, batches, heads=keep_heads is not None,
                                         channels=keep_channels is not None)
    heads = ffn = query = kv = channels = None
    if keep_heads is not None:
        query, kv = map(list, zip(*(choose_heads(layer, shape, keep_heads) for layer in scores.heads), strict=True))
        heads = {"query_heads": keep_heads, "kv_heads": len(kv[0]), "teacher_query_heads": shape.num_heads,
                 "teacher_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "kept_query_heads": query,
                 "kept_kv_heads": kv, "importance": scores.heads}
    if keep_channels is not None:
        channels = [top_channels(layer, keep_channels) for layer in scores.channels]
        ffn = {"width": keep_channels, "teacher_width": shape.ffn_width}
    return prune(model, family, query_heads=query, kv_heads=kv, channels=channels), heads, ffn


def _save(model, tokenizer, report: dict, output: Path) -> None:
    """Write the model, tokenizer and report under a temporary name beside `output`, then rename it `output`."""
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temporary, output)  # replaces an empty directory too
    log.info("student saved to %s", output)


def summary(report: dict) -> str:
    """A few lines on what the student kept and its size."""
    layers, parameters = report["layers"], report["parameters"]
    lines = [f"layers  {len(layers['kept'])} of {layers['teacher']} ({layers['method']}): "
             f"{', '.join(map(str, layers['kept']))}"]
    if heads := report.get("heads"):
        lines.append(f"heads   {heads['query_heads']} of {heads['teacher_query_heads']} query heads, "
                     f"{heads['kv_heads']} of {heads['teacher_kv_heads']} KV heads per layer")
    if ffn := report.get("ffn"):
        lines.append(f"FFN     {ffn['width']} of {ffn['teacher_width']} channels per layer")
    lines.append(f"params  {parameters['student'] / 1e6:.2f}M of the teacher's {parameters['teacher'] / 1e6:.2f}M: "
                 f"{parameters['compression_ratio']:.2f}x smaller")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click_options(StudentInitConfig)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool, **params) -> None:
    """Build a smaller student from a teacher by structured pruning: drop layers, attention heads and FFN channels,
    and save it as a standard HF model for `student-train --student`.

    \b
    Example:
      student-init --teacher /models/teacher --output students/half --layers 16 --layer-importance \\
          --heads 0.75 --ffn 0.5 --store /cache/run1 --calibration-samples 64
      student-init --teacher /models/teacher --output students/every-other --layers 16   # no store needed

    \b
    What is kept, in this order:
      layers  --keep-layers 0,2,4; or --layers N: evenly spaced from 0, or the N most important
              (--layer-importance: the rise of the calibration CE when the layer alone is skipped)
      heads   --heads: in every layer, the query heads of highest Taylor importance, |sum of gradient x
              activation| at the input of the attention's output projection. Grouped-query attention stays
              valid: a multiple of the KV heads keeps every KV head and its best query heads; otherwise a
              multiple of the query heads per KV head keeps the best whole KV groups. Llama, Mistral, Qwen2,
              Qwen3 (not GPT-2, whose head size is tied to its width).
      FFN     --ffn: in every layer, the channels of highest mean |activation| entering the FFN's output
              projection (act(gate) * up; act(c_fc) for GPT-2). Llama, Mistral, Qwen2, Qwen3, GPT-2.
    Every layer keeps as many heads and channels, as HF configs require. Heads and channels are scored on the
    model of the kept layers, over the trained positions of --calibration-samples samples of --store. The report
    (parameters before and after, compression ratio, kept layers, heads and width, scores) is OUTPUT/student_init.json.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(StudentInitConfig, params)
    try:
        report = prune_teacher(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary(report))
    click.echo(f"Student saved to {config.output} (report: {REPORT_NAME}).")


if __name__ == "__main__":
    main()
