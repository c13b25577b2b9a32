"""`student-train`: train students from a teacher-cache store."""

from __future__ import annotations

import click

from storage.fs import Location
from storage.manifest import Manifest
from student_train.compat import check_student


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Train a student LLM on targets cached by `teacher-cache build`."""


@main.command()
@click.option("--store", required=True, help="Store written by `teacher-cache build`.")
@click.option("--student", required=True, help="Student model or config directory (with tokenizer).")
def check(store: str, student: str) -> None:
    """Check that STUDENT shares the store's tokenizer and vocabulary."""
    try:
        manifest = Manifest.load(Location(store))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    problems = check_student(manifest, student)
    if problems:
        raise click.ClickException("\n".join(problems))
    click.echo(f"{student} can train on {store}: same tokenizer, vocabulary {manifest.teacher['vocab_size']}.")
