"""The options of the distillation loss: `LossConfig`, its term names, schedules and implementations, and the checks of
which divergences and temperatures each target representation supports.

Sits below `student_train.losses` (which computes the loss a `LossConfig` describes) and its two paths,
`student_train.fused_loss` and `student_train.liger`, which read the same config; the trainer's options
(`student_train.config`) build one. Nothing here touches a tensor: the representations and divergences it names are
those of `student_train.divergences`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from student_train.divergences import CROSS_TARGETS, DIVERGENCES, ONLINE, TARGETS_FROM
from student_train.targets.topk import TOPK

CE = "ce"
# The on-policy reverse KL estimated on the student's own samples (`student_train.divergences.rollout_rkl`).
ROLLOUT = "rollout_rkl"
LOSS_NAMES = (*DIVERGENCES, CE, ROLLOUT)  # the terms a loss mixes
# KD schedules: STEPS is a number of optimizer steps.
SCHEDULES = ("constant", "linear_warmup:STEPS", "cosine_decay:STEPS")
# Representations that read the stored top-k, which `LossConfig.top_k` may narrow.
TOPK_REPRESENTATIONS = TOPK.representations
# Representations of draws the store made at T = 1, of the whole distribution or of its tail: why no other T works.
DRAWN = {
    "sampled": "the stored draws come from the teacher at temperature 1, so counts / N estimates the untempered "
               "distribution",
    "hybrid": "the stored tail draws come from the teacher at temperature 1, so tail mass * counts / N estimates its "
              "untempered tail",
}
# Representations whose target is 0 on ids where the student is not: why reverse KL is infinite there.
ZERO_OFF_SUPPORT = {
    "sampled": "the draws' empirical distribution is 0 on every id not drawn, where the student is not, so "
               "KL(q || counts / N) is infinite",
    "hybrid": "the tail estimate tail mass * counts / N is 0 on every tail id not drawn, where the student is not, so "
              "KL(q || p-hat) is infinite",
    "topk_residual": "the target is 0 on every id outside the top-k and the true token, where the student is not, so "
                     "KL(q || p~) is infinite",
}
# How the chunks of the loss are computed: see `LossConfig.impl`.
LOSS_IMPLS = ("fused", "checkpoint")


def kd_scale(schedule: str, step: int) -> float:
    """The factor on the KD terms at optimizer step `step` (0 for the first step).

    - constant: 1.
    - linear_warmup:N: (step + 1) / N up to 1, reached at step N - 1 (CE leads the first steps when it has weight).
    - cosine_decay:N: (1 + cos(pi * step / N)) / 2, from 1 at step 0 to 0 at step N and after (KD early, CE late).

    Raises:
        ValueError: `schedule` is none of those.
    """
    name, _, steps = schedule.partition(":")
    if name == "constant" and not steps:
        return 1.0
    if name in ("linear_warmup", "cosine_decay") and steps.isdigit() and int(steps) > 0:
        n = int(steps)
        if name == "linear_warmup":
            return min(1.0, (step + 1) / n)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / n)))
    raise ValueError(f"kd_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)} (STEPS a positive integer), "
                     "e.g. linear_warmup:500.")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the student learns from the targets.

    Attributes:
        weights: weight of each term, by name: a key of DIVERGENCES, "ce" or "rollout_rkl". Weights are >= 0, not
            all 0. rollout_rkl estimates, on a store built over the student's own rollouts, the sum over the
            student's positions of KL(q(.|prefix) || p(.|prefix)), the prefixes being the student's samples, from
            the stored log-probs of the sampled tokens alone (no target representation); the prefix distribution is
            not differentiated, as in GKD and per-token on-policy distillation (see
            `student_train.divergences.rollout_rkl`). Temperature 1 only; not with online targets.
        targets: the target representation of every divergence, a key of TARGETS_FROM: the store's (REPRESENTATIONS),
            ONLINE, the full distribution of a teacher run beside the student (`distillation_loss`'s
            `teacher_head`), or one of CROSS_TARGETS, for a student whose tokenizer differs from the teacher's (see
            `student_train.cross_losses`; not with rollout_rkl).
        temperature: softmax temperature of the divergences (their sum is scaled by T^2); must be 1 with sampled,
            hybrid and chunks (whose temperature is `chunk_temperature`).
        jsd_beta: jsd's beta, in (0, 1): the teacher's share of the mixture m = beta p + (1 - beta) q.
        skew_alpha: skew_kl's and skew_rkl's alpha, in (0, 1): the share of the first distribution in the mixture.
        kd_schedule: factor on the divergences and rollout_rkl by optimizer step, one of SCHEDULES (see `kd_scale`).
        chunk_positions: positions whose student logits exist at once.
        sampled_tail_bucket: the store's sampled draws include a tail bucket (id TAIL_BUCKET once collated), whose
            student probability is the mass outside the position's top-k ids; the batch must hold `topk_ids`.
        fused_ce: CE comes from Liger-kernel's fused linear cross-entropy (CUDA, liger_kernel installed; see
            `student_train.liger.use_liger`) instead of the chunks; only for a loss of CE alone. Same numbers.
        top_k: with topk_tail, topk_renorm or topk_residual, use only the `top_k` most probable of the stored ids;
            the others' mass joins the tail (topk_tail, topk_residual) or is dropped with it (topk_renorm). Refused
            with hybrid. None: every stored id.
        impl: how the chunks are computed, one of LOSS_IMPLS. "fused": each chunk's logits once, their gradient
            built in forward and kept as the hidden states' and head's gradients until backward (see
            `student_train.fused_loss`); "checkpoint": each chunk under activation checkpointing, its logits
            recomputed in backward (slower; the reference). Same loss and gradients. Online targets always use
            "checkpoint", and the cross-tokenizer targets their own checkpointed chunks (`student_train.cross_losses`);
            `fused_ce` takes precedence for CE alone.
        rollout_clip: rollout_rkl's truncation C >= 1 of its importance weights min(q(x) / mu(x), C), mu the
            distribution the student sampled x from when it generated: they correct for the student's drift since.
        chunk_temperature: tau > 0 of the chunks targets: each aligned chunk's log-likelihood is divided by tau before
            the binary distributions "this chunk or not" are compared, and each chunk's divergence is scaled by tau
            (see `student_train.cross_losses`); 100 as in tokenkit's approximate likelihood matching.
    """

    weights: dict[str, float] = field(default_factory=lambda: {"forward_kl": 1.0})
    targets: str = "topk_tail"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    kd_schedule: str = "constant"
    chunk_positions: int = 1024
    sampled_tail_bucket: bool = False
    fused_ce: bool = False
    top_k: int | None = None
    impl: str = "fused"
    rollout_clip: float = 2.0
    chunk_temperature: float = 100.0

    def __post_init__(self) -> None:
        unknown = [name for name in self.weights if name not in LOSS_NAMES]
        if unknown:
            raise ValueError(f"loss {unknown[0]!r} is not one of {', '.join(LOSS_NAMES)}.")
        bad = {name: weight for name, weight in self.weights.items() if not (math.isfinite(weight) and weight >= 0)}
        if bad:
            raise ValueError(f"loss weights: expected finite weights >= 0, got {bad}.")
        if not any(self.weights.values()):
            raise ValueError(f"loss weights: all are 0 ({self.weights}); give at least one term a positive weight.")
        if self.targets not in TARGETS_FROM:
            raise ValueError(f"targets: {self.targets!r} is not one of {', '.join(TARGETS_FROM)}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a positive temperature, got {self.temperature}.")
        if not (math.isfinite(self.chunk_temperature) and self.chunk_temperature > 0):
            raise ValueError(f"chunk_temperature: expected a finite temperature > 0 for the chunks' log-likelihoods, "
                             f"got {self.chunk_temperature}.")
        for name in ("jsd_beta", "skew_alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a value in (0, 1), got {getattr(self, name)}.")
        kd_scale(self.kd_schedule, 0)
        if self.chunk_positions < 1:
            raise ValueError(f"chunk_positions: expected a positive number of positions, got {self.chunk_positions}.")
        if self.divergence_weights:
            self._check_representation()
        self._check_rollout()
        if self.fused_ce and self.kd_weights:
            raise ValueError(f"fused_ce: Liger's fused kernel computes CE alone, and the loss also has "
                             f"{', '.join(self.kd_weights)}; use the torch path for a mix.")
        if self.top_k is not None and self.targets == "hybrid":
            raise ValueError(f"top_k: {self.top_k} cannot narrow hybrid targets: their tail draws are of the ids "
                             "outside the stored top-k, so ids dropped from the head would be neither exact nor "
                             "drawn. Leave top_k out, or use topk_tail or topk_residual with top_k.")
        if self.top_k is not None and (self.top_k < 1 or self.targets not in TOPK_REPRESENTATIONS):
            raise ValueError(f"top_k: {self.top_k} keeps the most probable of the stored top-k ids, which needs a "
                             f"positive number and top-k targets ({' or '.join(TOPK_REPRESENTATIONS)}), and the "
                             f"targets are {self.targets}.")
        if self.impl not in LOSS_IMPLS:
            raise ValueError(f"impl: {self.impl!r} is not one of {', '.join(LOSS_IMPLS)}.")

    def _check_rollout(self) -> None:
        """rollout_clip, and the temperature and targets rollout_rkl supports."""
        if not self.rollout_clip >= 1.0:
            raise ValueError(f"rollout_clip: expected a truncation of the importance weights >= 1, got "
                             f"{self.rollout_clip}.")
        if ROLLOUT not in self.kd_weights:
            return
        if self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} cannot be used with {ROLLOUT}: it compares the untempered "
                "log-probs of the sampled tokens (the student's, the teacher's and the generator's). Use temperature "
                f"1.0, or drop {ROLLOUT}."
            )
        if self.targets == ONLINE:
            raise ValueError(
                f"{ROLLOUT} cannot be used with online targets: it reads the log-probs that the store's teacher gave "
                f"the sampled tokens, not the online teacher's. Drop --online-teacher, or drop {ROLLOUT}."
            )
        if self.targets in CROSS_TARGETS:
            raise ValueError(
                f"{ROLLOUT} cannot be used with {self.targets} targets: it compares the student's log-prob of each "
                "sampled token with the teacher's log-prob of the same token, and a student with another tokenizer "
                f"samples tokens the teacher never scored. Drop {ROLLOUT}, or train a student with the teacher's "
                "tokenizer."
            )

    def _check_representation(self) -> None:
        """The temperature and divergences the targets support."""
        if self.targets == "chunks" and self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} cannot be used with chunks targets: they compare the likelihoods "
                "of whole chunks of text, not next-token distributions, and are tempered by --chunk-temperature. "
                "Use temperature 1.0 and set --chunk-temperature instead."
            )
        if self.targets in DRAWN and self.temperature != 1.0:
            raise ValueError(
                f"temperature: {self.temperature} cannot be used with {self.targets} targets: {DRAWN[self.targets]}, "
                "and a tempered one (proportional to p^(1/T)) cannot be recovered from draws. Use temperature 1.0, "
                "or top-k targets."
            )
        if self.targets in ZERO_OFF_SUPPORT and "reverse_kl" in self.kd_weights:
            other = "top-k targets" if self.targets == "sampled" else "topk_tail targets"
            raise ValueError(
                f"reverse_kl cannot be used with {self.targets} targets: {ZERO_OFF_SUPPORT[self.targets]}. Use "
                f"skew_rkl (finite), jsd or tv, or {other}."
            )

    @property
    def kd_weights(self) -> dict[str, float]:
        """The KD terms of the mix with a positive weight: the divergences and rollout_rkl, those the KD schedule
        scales."""
        return {name: weight for name, weight in self.weights.items() if name != CE and weight > 0}

    @property
    def divergence_weights(self) -> dict[str, float]:
        """The divergences of the mix with a positive weight: the terms that read the target representation."""
        return {name: weight for name, weight in self.kd_weights.items() if name != ROLLOUT}

    def parameter(self, divergence: str) -> float:
        """The parameter passed to a divergence: jsd's beta, the skew divergences' alpha (unused by the others)."""
        return self.jsd_beta if divergence == "jsd" else self.skew_alpha
