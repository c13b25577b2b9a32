"""The metric math of `student-train eval`: small pure functions on tensors, summed a chunk of positions at a time.

Each function takes the log-probs of one chunk of P positions and returns sums (float64), so the caller adds chunks
and divides once at the end; no [batch, time, vocab] tensor is needed. `ScoreTotals` does that bookkeeping for a
teacher and a student scored on the same positions. Calibration is that of the top-1 prediction: confidence is
the largest probability, correct means the argmax is the true next token.

Legend: P positions, V teacher vocabulary, W student vocabulary (W >= V; ids >= V are padding the teacher never
predicts), N calibration bins.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from storage.identity import WEIGHT_SUFFIXES

ECE_BINS = 15


def perplexity(lm_loss: float) -> float:
    """exp(mean NLL in nats); inf when that overflows a float."""
    return math.exp(lm_loss) if lm_loss < math.log(1.7e308) else math.inf


def calibration_bins(confidence_P: torch.Tensor, correct_P: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """[3, N] float64: per equal-width confidence bin, the count, the sum of confidences and the number correct.

    Bin i holds the confidences in (i/N, (i+1)/N] (bin 0 also holds 0). The rows add up over chunks.
    """
    index_P = (confidence_P.double() * bins).ceil().long().sub(1).clamp(0, bins - 1)
    out_3N = torch.zeros(3, bins, dtype=torch.float64, device=confidence_P.device)
    out_3N[0].index_add_(0, index_P, torch.ones_like(index_P, dtype=torch.float64))
    out_3N[1].index_add_(0, index_P, confidence_P.double())
    out_3N[2].index_add_(0, index_P, correct_P.double())
    return out_3N


def expected_calibration_error(bins_3N: torch.Tensor) -> float:
    """sum over bins of (n_b / n) |accuracy_b - confidence_b| = sum |correct_b - confidence sum_b| / n."""
    count = float(bins_3N[0].sum())
    return float((bins_3N[2] - bins_3N[1]).abs().sum()) / count if count else math.nan


def ece(confidence_P: torch.Tensor, correct_P: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-1 predictions with `bins` equal-width confidence bins."""
    return expected_calibration_error(calibration_bins(confidence_P, correct_P, bins))


def reliability_diagram(bins_3N: torch.Tensor) -> list[dict]:
    """Per bin: its confidence range, count, mean confidence and accuracy (None for an empty bin)."""
    n = bins_3N.shape[1]
    return [{"lower": i / n, "upper": (i + 1) / n, "count": int(count),
             "confidence": confidence / count if count else None, "accuracy": correct / count if count else None}
            for i, (count, confidence, correct) in enumerate(zip(*bins_3N.tolist(), strict=True))]


def nll_sum(logprobs_PV: torch.Tensor, target_P: torch.Tensor) -> float:
    """Sum of the negative log-likelihoods of the true next tokens."""
    return -float(logprobs_PV.gather(1, target_P[:, None]).double().sum())


def top1_calibration(logprobs_PV: torch.Tensor, target_P: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """`calibration_bins` of the top-1 predictions of these log-probs."""
    top_logprob_P, top_id_P = logprobs_PV.max(-1)
    return calibration_bins(top_logprob_P.exp(), top_id_P == target_P, bins)


def kl_sum(teacher_logprobs_PV: torch.Tensor, student_logprobs_PW: torch.Tensor) -> float:
    """Sum over positions of KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), exact, in nats.

    The student's ids beyond the teacher's vocabulary carry probability the teacher gives none: they only lower
    the student's log-probs of the real ids, which the sum over the teacher's V ids sees.
    """
    V = teacher_logprobs_PV.shape[1]
    diff_PV = teacher_logprobs_PV - student_logprobs_PW[:, :V]
    return float((teacher_logprobs_PV.exp() * diff_PV).double().sum())


def top1_agreements(teacher_logprobs_PV: torch.Tensor, student_logprobs_PW: torch.Tensor) -> int:
    """Positions where the student's most likely id is the teacher's."""
    return int((teacher_logprobs_PV.argmax(-1) == student_logprobs_PW.argmax(-1)).sum())


class ScoreTotals:
    """Running sums of a teacher and a student scored on the same positions; `result()` turns them into metrics."""

    def __init__(self, bins: int = ECE_BINS):
        self.bins = bins
        self.tokens = 0
        self.nll = {"teacher": 0.0, "student": 0.0}
        self.calibration = {name: torch.zeros(3, bins, dtype=torch.float64) for name in self.nll}
        self.kl = 0.0
        self.agreements = 0

    def add(self, teacher_logprobs_PV: torch.Tensor, student_logprobs_PW: torch.Tensor, target_P: torch.Tensor) -> None:
        """Add a chunk: both models' fp32 log-probs at the same positions and the true next tokens."""
        self.tokens += len(target_P)
        for name, logprobs in (("teacher", teacher_logprobs_PV), ("student", student_logprobs_PW)):
            self.nll[name] += nll_sum(logprobs, target_P)
            self.calibration[name] += top1_calibration(logprobs, target_P, self.bins).cpu()
        self.kl += kl_sum(teacher_logprobs_PV, student_logprobs_PW)
        self.agreements += top1_agreements(teacher_logprobs_PV, student_logprobs_PW)

    def result(self) -> dict[str, dict]:
        """Per model: lm_loss, perplexity, kl_to_teacher, top1_agreement, ece, reliability (the teacher's KL is 0
        and its agreement 1 by definition)."""
        n = max(self.tokens, 1)
        out = {}
        for name in self.nll:
            loss = self.nll[name] / n
            out[name] = {"tokens": self.tokens, "lm_loss": loss, "perplexity": perplexity(loss),
                         "kl_to_teacher": 0.0 if name == "teacher" else self.kl / n,
                         "top1_agreement": 1.0 if name == "teacher" else self.agreements / n,
                         "ece": expected_calibration_error(self.calibration[name]),
                         "reliability": reliability_diagram(self.calibration[name])}
        return out


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model; a weight shared by two modules (tied embeddings) counts once."""
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files (.safetensors, .bin, ...) directly in a model directory."""
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
