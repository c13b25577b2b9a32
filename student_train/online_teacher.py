"""The teacher run beside the student for online full-distribution KD (`--online-teacher`): the baseline the store's
cached targets are measured against.

Sits beside the store in the trainer: the store still gives each micro-batch's token ids and masks (its targets are
not read), `hidden` runs the teacher's base model to its final hidden states [B, L, G] without gradient, and
`student_train.losses` applies `logits` (the teacher's head with any logit post-processing) to one chunk of trained
positions at a time inside the loss, so the teacher's [C, V] logits exist per chunk only, like the student's. The
teacher is frozen and in eval mode; it is in no optimizer, checkpoint or saved student.

Legend: B batch, L positions, G the teacher's hidden size, C positions in a chunk, V the teacher's vocabulary, W the
student's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from storage.causal_lm import CausalLM, forward_inputs
from storage.identity import weights_fingerprint
from storage.manifest import Manifest, isolates_documents
from student_train.loss_config import LossConfig
from student_train.student import compatibility_problems

log = logging.getLogger(__name__)


class OnlineTeacher:
    """A local HF causal LM with the store's tokenizer and vocabulary, loaded frozen on the training device.

    Args:
        path: the teacher's local model directory (weights, config, tokenizer).
        manifest: the training store's manifest, whose tokenizer and vocabulary the teacher must have.
        device: the training device.
        bf16: load the weights in bfloat16 (the student trains under bf16 autocast), else float32.

    Raises:
        ValueError: no such directory, or a tokenizer or vocabulary other than the store's (checked before the
            weights are read).
        RuntimeError: an architecture whose logits the base model + head path does not reproduce.
    """

    def __init__(self, path: str, manifest: Manifest, *, device: torch.device, bf16: bool):
        if not Path(path).expanduser().is_dir():
            raise ValueError(f"--online-teacher {path}: no such directory; pass the teacher's local HF model "
                             "directory (config, weights and tokenizer).")
        vocab = AutoConfig.from_pretrained(path).vocab_size
        problems = compatibility_problems(AutoTokenizer.from_pretrained(path), vocab, manifest, path,
                                          role="online teacher")
        if vocab > manifest.teacher["vocab_size"]:
            problems.append(f"vocab size mismatch: the online teacher {path} predicts {vocab} ids, the store's teacher "
                            f"{manifest.teacher['model']} {manifest.teacher['vocab_size']}. Use the teacher that "
                            "built the store.")
        if problems:
            raise ValueError("\n".join(problems))
        self.lm = CausalLM(path, device=str(device), dtype="bfloat16" if bf16 else "float32")
        self.lm.model.requires_grad_(False)
        self.vocab_size = self.lm.vocab_size
        self.isolated = isolates_documents(manifest.build)  # each packed document alone, as the store's teacher saw it
        if weights_fingerprint(self.lm.path) != manifest.teacher["weights_sha256"]:
            log.warning("--online-teacher %s has other weights than the teacher %s that built the store; the "
                        "held-out KL compares with the store's targets, the training with this teacher", path,
                        manifest.teacher["model"])
        log.info("online KD: teacher %s (%.1fM parameters, %s) on %s; the store's targets are not read", path,
                 self.lm.model.num_parameters() / 1e6, str(self.lm.model.dtype).removeprefix("torch."),
                 self.lm.device)

    def check_loss(self, loss_config: LossConfig, student_vocab: int) -> None:
        """Refuse reverse KL when the student has ids the teacher does not: KL(q || p) is infinite there.

        Raises:
            ValueError: naming the vocabularies and the divergences that stay finite.
        """
        if student_vocab > self.vocab_size and "reverse_kl" in loss_config.kd_weights:
            extra = student_vocab - self.vocab_size
            raise ValueError(f"reverse_kl with --online-teacher: the student predicts {student_vocab} ids and the "
                             f"teacher {self.vocab_size}, so the teacher's probability is 0 on {extra} ids where the "
                             "student's is not, and KL(q || p) is infinite. Use skew_rkl (finite), jsd, tv or "
                             "forward_kl, or a student with the teacher's vocabulary.")

    @torch.no_grad()
    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's final hidden states [B, L, G] over a collated batch, the student's inputs."""
        segments = batch["segment_ids"][:, :-1] if self.isolated else None
        return self.lm.model.base_model(**forward_inputs(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                                         segments)).last_hidden_state

    def logits(self, hidden_CG: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [C, V] of a chunk of its hidden states (the loss calls it without gradient)."""
        return self.lm.logits(hidden_CG)
