"""Checks that a student can learn from a store: same tokenizer, and a vocabulary that covers the teacher's ids."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from storage.identity import tokenizer_fingerprint
from storage.manifest import Manifest


def check_student(manifest: Manifest, student: str) -> list[str]:
    """Problems that stop `student` (a local model or config directory) from training on the store's targets."""
    teacher = manifest.teacher
    if not Path(student).is_dir():
        return [f"--student {student}: no such directory; pass a local model or config directory with its tokenizer."]
    problems = []
    tokenizer = AutoTokenizer.from_pretrained(student)
    if tokenizer_fingerprint(tokenizer) != teacher["tokenizer_sha256"]:
        problems.append(
            f"tokenizer mismatch: the store was built with {teacher['model']}'s tokenizer "
            f"({teacher['tokenizer_vocab_size']} tokens, sha256 {teacher['tokenizer_sha256'][:12]}), the student "
            f"{student} has {len(tokenizer)} tokens (sha256 {tokenizer_fingerprint(tokenizer)[:12]}). "
            "Use a student with the teacher's tokenizer."
        )
    vocab = AutoConfig.from_pretrained(student).vocab_size
    if vocab < teacher["tokenizer_vocab_size"]:
        problems.append(
            f"vocab size mismatch: the student's output layer has {vocab} ids, the teacher's tokenizer "
            f"{teacher['tokenizer_vocab_size']} (logits {teacher['vocab_size']}). Resize the student's embeddings."
        )
    return problems
