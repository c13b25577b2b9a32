"""The math of one chunk of positions: teacher and student as distributions over the same buckets, and divergences.

Used by `student_train.losses`, which applies the student's head a chunk of positions at a time and calls these on
that chunk's [C, V] logits. Nothing here sees more than one chunk. With the store's targets no dense teacher
distribution exists: the teacher is whatever the store kept (top-k + tail mass, or sampled draws). Online KD (the
baseline the stored targets are measured against) is the exception: the teacher runs beside the student and its
[C, V] logits of the same chunk arrive here.

A *target representation* turns the student's logits and the stored targets into two distributions over J buckets,
log p (teacher) and log q (student), each summing to 1. A *divergence* D(p, q) is then computed over those buckets.
p may be exactly 0 (log p = -inf) in a bucket; the student's log q is always finite (a bucket it must not hold is
the most negative float, so exp gives 0), which keeps every gradient finite. 0 log 0 counts as 0.

Representations (T the temperature, z the student's logits):
- `topk_tail`: J = K + 1, the K stored ids plus a "ghost" bucket for the rest of the vocabulary. Teacher:
  log-softmax over the K + 1 buckets of (stored log-prob, `tail_logmass`) / T. Tempering the tail as one bucket is
  an approximation (the exact tempered tail is sum over tail ids of p_v^(1/T), which the store cannot give); it is
  exact at T = 1, where the renormalisation only removes the fp16 rounding of the stored log-probs. Student:
  q = softmax(z / T) over the whole vocabulary, read at the K ids; its bucket is its mass on the other ids, a
  log-sum-exp over them (exact, no 1 - sum q cancellation when the tail is tiny).
- `topk_renorm`: J = K, teacher log-softmax(log p_k / T) and student log-softmax(z_k / T), both renormalised over
  the K ids. Biased: the student is pushed to put nothing on the tail (over-confident); offered for comparison.
- `sampled`: N draws from the teacher at T = 1, stored as distinct ids + counts. Teacher: the empirical
  distribution c_i / N, zero off the drawn ids. Student: q = softmax(z) at the drawn ids, plus one bucket holding
  its mass on every id not drawn (where the empirical target is 0). For the divergences below, summing the undrawn
  ids into one bucket changes nothing (with p = 0, each one's term is linear in q there: q / 2 for tv,
  q (1 - beta) log(1 / (1 - beta)) for jsd, ...), so each is exactly D(counts / N, q) over the whole vocabulary: a
  plug-in estimate from the draws. Only T = 1 (draws from a tempered teacher cannot be recovered). Stores built
  with the vllm backend draw from the top-k plus a tail bucket (collated as id TAIL_BUCKET); that bucket's q is the
  student's mass outside the position's top-k, so the estimate is of the K + 1-bucket divergence (as `topk_tail`),
  not the full-vocabulary one.
- `hybrid`: the exact top-k head plus N draws from the teacher's tail (ids outside the top-k, drawn from p_v / t, t
  the tail mass) at T = 1, stored as distinct ids + counts; J = K + M + 1. Teacher p-hat: the K head buckets exact
  (log-softmax of the stored log-probs and `tail_logmass`, as `topk_tail` at T = 1), t * c_v / N at each drawn tail
  id, and a rest bucket of probability 0. A position without draws (the store draws none where the tail mass is 0)
  keeps its tail mass, if any, in the rest bucket, as `topk_tail` does. Student: q = softmax(z) at the head ids and
  the drawn ids, plus its mass on every other id in the rest bucket. E[t c_v / N] = p_v for every tail id, so p-hat is
  unbiased for the teacher over the whole vocabulary, and the forward-KL gradient q - p-hat is the full forward KL's
  gradient q - p in expectation: no variance on the head (where `sampled` spends most of its draws) and no truncation
  bias (as `topk_*` have). As with `sampled`, the rest bucket's target of 0 makes each divergence exactly D(p-hat, q)
  over the whole vocabulary, a plug-in estimate: forward KL's value is biased by the empirical entropy of the tail (a
  constant for the student); every other divergence is a biased estimate of the teacher's, its bias confined to the
  tail and shrinking as N grows. Reverse KL is refused (p-hat is 0 on the undrawn tail ids). Only T = 1: the tail
  draws come from the untempered teacher.
- `topk_residual`: a top-k store's tail mass given to the true next token y (the "residual to the true token"
  baseline); J = K + 2. Teacher p~: the K head buckets exact (renormalised as `topk_tail`'s), plus t on y: in its own
  bucket when y is outside the top-k, added to y's head bucket when inside (its own bucket then empty); and a rest
  bucket of probability 0. Student: q at the K ids and at y, plus its mass on every other id in the rest bucket. p~
  lives on at most K + 1 ids, so each divergence is exactly D(p~, q) over the whole vocabulary. It is biased:
  p~ = p_head + t onehot(y), and the forward-KL gradient q - p~ differs from q - p by p_tail - t onehot(y) (p_tail the
  teacher on the tail, of mass t). Even when the data follows the teacher (y ~ p), E[p~] = p_head + t p: each tail id
  gets t p_v instead of p_v and the head the rest, so the student is pulled towards the head and the data's tokens;
  the bias vanishes as t -> 0. With y in the tail, forward KL to p~ is the head's terms plus t log(t / q_y): KD on the
  head plus t-weighted CE on the true token. Reverse KL is refused (p~ is 0 in the rest bucket). Temperature: p~ is
  built at T = 1, then tempered exactly (p~^(1/T) renormalised over its buckets), against softmax(z / T); as with
  `topk_tail`, this tempers the tail mass as one token, an approximation of the teacher's tempered tail, exact at
  T = 1.
- `online`: the teacher's full distribution, J = V: log-softmax(teacher logits / T) and log-softmax(z / T) over
  the whole vocabulary, both tempered exactly; every divergence below is then the exact divergence of the two
  tempered distributions. A student vocabulary W wider than the teacher's V (padding ids) gives the teacher
  probability 0 on the extra ids (log p = -inf), which every divergence handles except reverse KL (infinite
  there; the trainer refuses that pair).

Divergences (p teacher, q student over the buckets; all >= 0 and 0 when p = q):
- `forward_kl`: KL(p || q) = sum p log(p / q). Mean-seeking. With `sampled` its gradient q - c/N is the full
  forward KL's gradient q - p in expectation (random-sampling KD, unbiased), and so is q - p-hat with `hybrid`; its
  value is biased by the empirical entropy, a constant for the student.
- `reverse_kl`: KL(q || p) = sum q log(q / p). Mode-seeking. Infinite wherever p = 0 < q, hence refused with
  `sampled` and `hybrid` (the empirical target is 0 on every undrawn id) and `topk_residual` (0 off the head and
  the true token).
- `jsd`: generalised Jensen-Shannon with beta in (0, 1): beta KL(p || m) + (1 - beta) KL(q || m), with
  m = beta p + (1 - beta) q (the GKD definition; beta = 0.5 is the symmetric JSD). Bounded by log 2 at beta = 0.5.
- `tv`: total variation, sum |p - q| / 2, in [0, 1].
- `skew_kl`: skew forward KL of DistiLLM, KL(p || a p + (1 - a) q) with a = skew_alpha in (0, 1); a -> 0 gives
  KL(p || q). Bounded by log(1/a), so its gradients stay tame where q is tiny.
- `skew_rkl`: skew reverse KL, KL(q || a q + (1 - a) p).
With `sampled`, and with `hybrid` on the tail, every divergence except forward KL is a biased estimate of the
divergence to the teacher (for example E TV(counts / N, q) >= TV(p, q)), with a bias that shrinks as the number of
draws grows; the draws are still useful as a target, but the estimate is not the teacher's divergence.

On-policy, without a representation: `rollout_rkl` reads only the student's log q(x) of the next token x, which the
student itself sampled (a store built over its rollouts), the teacher's stored log p(x) (`true_logprob`) and the
log-prob mu(x) the generator sampled x with (`behaviour_logprob`, NaN where x was not drawn). Per position, with
a = log q(x) - log p(x) and w = min(q(x) / mu(x), C): the value w a estimates KL(q(.|prefix) || p(.|prefix)), and
the gradient w a grad log q(x) estimates its gradient (E_q[a grad log q] = grad KL, as E_q[grad log q] = 0), both
exactly in expectation over x ~ mu while w is not truncated. The prefix, itself drawn from the student, is not
differentiated (as in GKD and per-token on-policy distillation).

A student whose tokenizer differs from the teacher's trains from the same store through other targets (`chunks`,
`mapped`, `sorted`: CROSS_TARGETS), which `student_train.cross_losses` computes with the divergences below.

Legend: C positions in a chunk, V vocabulary (with `online`: the student's is W >= the teacher's V), K top-k ids, M
sampled entries per position (padding: id 0, count 0), J buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from storage.targets.rollout import BEHAVIOUR_LOGPROB
from student_train.collate import TAIL_BUCKET

# The targets' entry of the true next token, [C] (see READS_TRUE_IDS).
TRUE_IDS = "true_ids"
# The batch records `rollout_rkl` reads, [C] each: the teacher's and the generator's log-prob of the next token.
TRUE_LOGPROB = "true_logprob"
ROLLOUT_KEYS = (TRUE_LOGPROB, BEHAVIOUR_LOGPROB)


class Logits:
    """The student's logits of one chunk, [C, V], as a representation reads them: through a few reductions.

    A representation never touches the [C, V] tensor itself (but for `online`, through `full`): it asks for the
    log-normaliser, the logits of some ids, and the log-sum-exp over the ids outside some set, each at a temperature.
    These three have simple gradients with respect to the logits (softmax, one-hot, softmax over the complement), so
    `student_train.fused_loss` can answer the same calls with small leaf tensors and build the [C, V] gradient
    itself in one pass; this eager implementation computes them on the tensor, for autograd.

    Every method takes T, the temperature: the logits it reads are z / T.
    """

    def __init__(self, logits_CV: torch.Tensor):
        self.logits_CV = logits_CV
        self._scaled: dict[float, torch.Tensor] = {}
        self._lse: dict[float, torch.Tensor] = {}

    def scaled(self, temperature: float) -> torch.Tensor:
        """z / T, [C, V] (no copy at T = 1)."""
        if temperature == 1.0:
            return self.logits_CV
        if temperature not in self._scaled:
            self._scaled[temperature] = self.logits_CV / temperature
        return self._scaled[temperature]

    def lse(self, temperature: float = 1.0) -> torch.Tensor:
        """log sum_v exp(z_v / T), [C, 1]."""
        if temperature not in self._lse:
            self._lse[temperature] = self.scaled(temperature).logsumexp(-1, keepdim=True)
        return self._lse[temperature]

    def gather(self, ids_CJ: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """z / T at the ids, [C, J] (ids in [0, V))."""
        return self.scaled(temperature).gather(-1, ids_CJ)

    def outside_lse(self, ids_CJ: torch.Tensor, temperature: float = 1.0,
                    valid_CJ: torch.Tensor | None = None) -> torch.Tensor:
        """log sum over the ids v not among `ids_CJ` of exp(z_v / T), [C, 1]; entries with `valid_CJ` false (padding)
        exclude nothing. Repeated ids are fine.

        The excluded ids are masked with the most negative finite float rather than -inf, so that an empty complement
        stays finite: the result is then a huge negative number that a target of 0 multiplies away, with no inf - inf
        in logsumexp or its backward.
        """
        tiny = torch.finfo(self.logits_CV.dtype).min
        excluded_CV = _id_mask(ids_CJ, self.logits_CV.shape[-1], valid_CJ)
        return self.scaled(temperature).masked_fill(excluded_CV, tiny).logsumexp(-1, keepdim=True)

    def full(self, temperature: float = 1.0) -> torch.Tensor:
        """z / T itself, [C, V]: only for a dense teacher (`online`), which has no sparse form."""
        return self.scaled(temperature)

    def top_ids(self, k: int) -> torch.Tensor:
        """The ids of the k largest logits, [C, k], in decreasing order of the logits (at every temperature): only
        for the cross-tokenizer `sorted` targets (`student_train.cross_losses`), which have no fused form."""
        return self.logits_CV.topk(k, -1).indices


def _id_mask(ids_CJ: torch.Tensor, vocab: int, valid_CJ: torch.Tensor | None = None) -> torch.Tensor:
    """[C, V] bool, true at the ids of the (valid) entries."""
    if valid_CJ is None:
        return torch.zeros(ids_CJ.shape[0], vocab, dtype=torch.bool, device=ids_CJ.device).scatter_(-1, ids_CJ, True)
    # Counted rather than scattered as bools: a padding entry must not clear a valid entry of the same id.
    counts_CV = torch.zeros(ids_CJ.shape[0], vocab, dtype=torch.int32, device=ids_CJ.device)
    return counts_CV.scatter_add_(-1, ids_CJ, valid_CJ.int()) > 0


# (student logits of a chunk, targets of the chunk, temperature) -> (log p, log q), each [C, J].
Representation = Callable[[Logits, dict[str, torch.Tensor], float], tuple[torch.Tensor, torch.Tensor]]
# (log p [C, J], log q [C, J], parameter) -> [C]; the parameter is jsd's beta or the skew alpha, else unused.
Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def topk_tail(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The K stored ids plus a ghost bucket for the rest of the vocabulary, J = K + 1."""
    ids_CK = targets["topk_ids"]
    lse_C1 = z.lse(temperature)
    logq_CK = z.gather(ids_CK, temperature) - lse_C1
    logq_CJ = torch.cat([logq_CK, z.outside_lse(ids_CK, temperature) - lse_C1], -1)
    teacher_CJ = torch.cat([targets["topk_logprobs"], targets["tail_logmass"][:, None]], -1)
    return F.log_softmax(teacher_CJ / temperature, -1), logq_CJ


def topk_renorm(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """Teacher and student both renormalised over the K stored ids, J = K (biased)."""
    logq_CK = F.log_softmax(z.gather(targets["topk_ids"], temperature), -1)
    return F.log_softmax(targets["topk_logprobs"] / temperature, -1), logq_CK


def sampled(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The empirical distribution of the draws over the drawn entries plus one bucket for the rest, J = M + 1."""
    assert temperature == 1.0, "sampled targets are draws at T = 1; LossConfig rejects other temperatures"
    counts_CM, ids_CM = targets["sampled_counts"], targets["sampled_ids"]
    drawn_CM = counts_CM > 0
    logp_CM = (counts_CM / counts_CM.sum(-1, keepdim=True)).log()  # padding (count 0) -> -inf
    lse_C1 = z.lse()
    safe_CM = ids_CM.clamp_min(0)  # one ids tensor for the gather and the rest's outside_lse: read once
    logq_CM = z.gather(safe_CM) - lse_C1
    real_CM = drawn_CM & (ids_CM != TAIL_BUCKET)
    tiny = torch.finfo(logq_CM.dtype).min
    if "topk_ids" in targets:  # draws from top-k + a tail bucket: the bucket is the mass outside the top-k
        ids_CK = targets["topk_ids"]
        logq_CM = torch.where(ids_CM == TAIL_BUCKET, z.outside_lse(ids_CK) - lse_C1, logq_CM)
        # The rest: every id neither drawn nor (when the bucket was drawn) outside the top-k. With the bucket drawn,
        # that is the top-k ids not drawn; without it, everything not drawn.
        bucket_drawn_C1 = (drawn_CM & ~real_CM).any(-1, keepdim=True)
        topk_drawn_CK = (ids_CK[:, :, None] == torch.where(real_CM, ids_CM, -2)[:, None, :]).any(-1)
        rest_in_topk_C1 = torch.where(topk_drawn_CK, tiny, z.gather(ids_CK)).logsumexp(-1, keepdim=True)
        logq_rest_C1 = torch.where(bucket_drawn_C1, rest_in_topk_C1, z.outside_lse(safe_CM, 1.0, real_CM))
    else:
        logq_rest_C1 = z.outside_lse(safe_CM, 1.0, real_CM)
    logq_CM = torch.where(drawn_CM, logq_CM, tiny)  # a padding entry is an empty bucket for the student too
    logq_rest_C1 = logq_rest_C1 - lse_C1
    logp_rest_C1 = torch.full_like(logq_rest_C1, -math.inf)
    return torch.cat([logp_CM, logp_rest_C1], -1), torch.cat([logq_CM, logq_rest_C1], -1)


def _head_and_tail(targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored top-k log-probs and tail log-mass renormalised together (removing their rounding), [C, K], [C, 1]."""
    logp_CJ = F.log_softmax(torch.cat([targets["topk_logprobs"], targets["tail_logmass"][:, None]], -1), -1)
    return logp_CJ[:, :-1], logp_CJ[:, -1:]


def hybrid(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The exact top-k head, the tail's drawn ids at tail mass * count / N, and a rest bucket, J = K + M + 1."""
    assert temperature == 1.0, "hybrid targets' tail draws are at T = 1; LossConfig rejects other temperatures"
    ids_CK, ids_CM, counts_CM = targets["topk_ids"], targets["sampled_ids"], targets["sampled_counts"]
    logp_CK, logtail_C1 = _head_and_tail(targets)
    draws_C1 = counts_CM.sum(-1, keepdim=True)
    # t * c / N in log space; padding (count 0) -> -inf. Without draws, the rest bucket holds the tail mass.
    logp_CM = logtail_C1 + counts_CM.log() - draws_C1.clamp_min(1).log()
    logp_rest_C1 = torch.where(draws_C1 > 0, -math.inf, logtail_C1)
    lse_C1 = z.lse()
    drawn_CM = counts_CM > 0
    tiny = torch.finfo(lse_C1.dtype).min
    ids_CJ = torch.cat([ids_CK, ids_CM], -1)  # one read of the head and drawn ids, whose outside is the rest
    logq_CJ = z.gather(ids_CJ) - lse_C1
    logq_CJ[:, ids_CK.shape[-1]:].masked_fill_(~drawn_CM, tiny)  # a padding entry is empty for the student too
    valid_CJ = torch.cat([torch.ones_like(ids_CK, dtype=torch.bool), drawn_CM], -1)
    logq_rest_C1 = z.outside_lse(ids_CJ, 1.0, valid_CJ) - lse_C1
    return torch.cat([logp_CK, logp_CM, logp_rest_C1], -1), torch.cat([logq_CJ, logq_rest_C1], -1)


def topk_residual(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The K stored ids exact, the tail mass on the true next token, and a rest bucket, J = K + 2."""
    ids_CK, true_C1 = targets["topk_ids"], targets[TRUE_IDS][:, None]
    logp_CK, logtail_C1 = _head_and_tail(targets)
    true_in_head_CK = ids_CK == true_C1
    true_in_head_C1 = true_in_head_CK.any(-1, keepdim=True)
    # The tail mass joins the true token: its head bucket when it has one (its own bucket then empty), else its own.
    logp_CK = torch.where(true_in_head_CK, torch.logaddexp(logp_CK, logtail_C1), logp_CK)
    logp_true_C1 = torch.where(true_in_head_C1, -math.inf, logtail_C1)
    logp_CJ = torch.cat([logp_CK, logp_true_C1, torch.full_like(logtail_C1, -math.inf)], -1)
    if temperature != 1.0:  # p~ tempered exactly: it lives on these buckets
        logp_CJ = F.log_softmax(logp_CJ / temperature, -1)
    lse_C1 = z.lse(temperature)
    tiny = torch.finfo(lse_C1.dtype).min
    logq_true_C1 = torch.where(true_in_head_C1, tiny, z.gather(true_C1, temperature) - lse_C1)
    logq_rest_C1 = z.outside_lse(torch.cat([ids_CK, true_C1], -1), temperature) - lse_C1
    return logp_CJ, torch.cat([z.gather(ids_CK, temperature) - lse_C1, logq_true_C1, logq_rest_C1], -1)


def mapped(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The teacher's top-k entries mapped to student ids (-1: none), plus a tail bucket holding the rest, J = K + 1:
    a student with another tokenizer (`student_train.cross_losses`, which documents it)."""
    ids_CK, logp_CK = targets["topk_ids"], targets["topk_logprobs"]
    valid_CK = ids_CK >= 0
    # The unmapped entries' mass joins the stored tail (exactly the tail when every entry is mapped).
    unmapped_C1 = logp_CK.masked_fill(valid_CK, -math.inf).logsumexp(-1, keepdim=True)
    teacher_CJ = torch.cat([logp_CK.masked_fill(~valid_CK, -math.inf),
                            torch.logaddexp(targets["tail_logmass"][:, None], unmapped_C1)], -1)
    ids_CK = ids_CK.clamp_min(0)
    lse_C1 = z.lse(temperature)
    tiny = torch.finfo(lse_C1.dtype).min
    logq_CK = torch.where(valid_CK, z.gather(ids_CK, temperature) - lse_C1, tiny)  # unmapped: empty for both
    logq_C1 = z.outside_lse(ids_CK, temperature, valid_CK) - lse_C1
    return F.log_softmax(teacher_CJ / temperature, -1), torch.cat([logq_CK, logq_C1], -1)


def online(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    """The teacher's full distribution over the whole vocabulary, J = W (the student's width, >= the teacher's V)."""
    teacher_CV = targets["teacher_logits"]
    logp_CV = F.log_softmax(teacher_CV if temperature == 1.0 else teacher_CV / temperature, -1)
    logits_CW = z.full(temperature)
    padding = logits_CW.shape[-1] - logp_CV.shape[-1]
    # Ids the student has and the teacher does not: probability 0 for the teacher (no copy when there are none).
    logp_CW = F.pad(logp_CV, (0, padding), value=-math.inf) if padding else logp_CV
    return logp_CW, F.log_softmax(logits_CW, -1)


def _kl(logx_CJ: torch.Tensor, logy_CJ: torch.Tensor) -> torch.Tensor:
    """sum x log(x / y) over the last axis, [C]; buckets with x = 0 contribute 0, with a finite gradient."""
    x_CJ = logx_CJ.exp()
    held_CJ = x_CJ > 0
    # Zero both logs where x = 0 before the product: 0 * (-inf) there would make the gradient NaN, not 0.
    logx_CJ, logy_CJ = torch.where(held_CJ, logx_CJ, 0.0), torch.where(held_CJ, logy_CJ, 0.0)
    return (x_CJ * (logx_CJ - logy_CJ)).sum(-1)


def _log_mix(loga_CJ: torch.Tensor, logb_CJ: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight a + (1 - weight) b), in log space; finite wherever either is."""
    return torch.logaddexp(loga_CJ + math.log(weight), logb_CJ + math.log1p(-weight))


def forward_kl(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, _: float) -> torch.Tensor:
    return _kl(logp_CJ, logq_CJ)


def reverse_kl(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, _: float) -> torch.Tensor:
    return _kl(logq_CJ, logp_CJ)


def jsd(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, beta: float) -> torch.Tensor:
    logm_CJ = _log_mix(logp_CJ, logq_CJ, beta)
    return beta * _kl(logp_CJ, logm_CJ) + (1 - beta) * _kl(logq_CJ, logm_CJ)


def tv(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, _: float) -> torch.Tensor:
    return 0.5 * (logp_CJ.exp() - logq_CJ.exp()).abs().sum(-1)


def skew_kl(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(logp_CJ, _log_mix(logp_CJ, logq_CJ, alpha))


def skew_rkl(logp_CJ: torch.Tensor, logq_CJ: torch.Tensor, alpha: float) -> torch.Tensor:
    return _kl(logq_CJ, _log_mix(logq_CJ, logp_CJ, alpha))


# The representations of the store's targets.
REPRESENTATIONS: dict[str, Representation] = {
    "topk_tail": topk_tail, "topk_renorm": topk_renorm, "sampled": sampled, "hybrid": hybrid,
    "topk_residual": topk_residual,
}
ONLINE = "online"
# The targets of a student whose tokenizer differs from the teacher's, over batches `student_train.cross_losses`
# computes (`losses.distillation_loss` dispatches them there): `mapped` reads the logits as the store's
# representations do, and its chunks of positions run here too; `chunks` and `sorted` never do.
CROSS_TARGETS = ("chunks", "mapped", "sorted")


def _cross(z: Logits, targets: dict[str, torch.Tensor], temperature: float):
    raise AssertionError("chunks and sorted targets are computed by student_train.cross_losses over the whole batch")


# Every representation a loss may use: the store's, the full distribution of a teacher run online, and the
# cross-tokenizer targets.
TARGETS_FROM: dict[str, Representation] = {**REPRESENTATIONS, ONLINE: online, "chunks": _cross, "mapped": mapped,
                                           "sorted": _cross}
# The batch records each representation reads (`sampled` also reads topk_ids when its draws have a tail bucket;
# `online` reads the teacher's final hidden states, which the trainer adds, and its head makes the teacher logits).
TARGET_KEYS: dict[str, tuple[str, ...]] = {
    "topk_tail": ("topk_ids", "topk_logprobs", "tail_logmass"),
    "topk_renorm": ("topk_ids", "topk_logprobs"),
    "sampled": ("sampled_ids", "sampled_counts"),
    "hybrid": ("topk_ids", "topk_logprobs", "tail_logmass", "sampled_ids", "sampled_counts"),
    "topk_residual": ("topk_ids", "topk_logprobs", "tail_logmass"),
    ONLINE: ("teacher_hidden",),
}
# Representations that also read the true next token of each position, which the loss adds as TRUE_IDS [C].
READS_TRUE_IDS = ("topk_residual",)
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "tv": tv, "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
}


def rollout_rkl(
    logq_C: torch.Tensor, targets: dict[str, torch.Tensor], clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token sample estimate of KL(q || p) at the student's sampled tokens (module docstring).

    Args:
        logq_C: the student's log-prob of each position's next token x (a differentiable function of its logits).
        targets: ROLLOUT_KEYS: the teacher's log p(x) and the generator's log mu(x), NaN where x was not drawn.
        clip: C, the truncation of the importance weights q(x) / mu(x).

    Returns:
        (surrogate [C], w [C]): the surrogate's value is w a, its gradient w a grad log q(x), with
        a = log q(x) - log p(x) and w = min(q(x) / mu(x), C) detached; both 0 where x was not drawn.
    """
    behaviour_C = targets[BEHAVIOUR_LOGPROB]
    drawn_C = behaviour_C.isfinite()
    logq_now_C = logq_C.detach()
    # where, not a product with a mask: NaN * 0 is NaN (undrawn positions have NaN log mu and any log p).
    weight_C = torch.where(drawn_C, (logq_now_C - behaviour_C).exp().clamp(max=clip), 0.0)
    coef_C = weight_C * torch.where(drawn_C, logq_now_C - targets[TRUE_LOGPROB], 0.0)
    return coef_C + coef_C * (logq_C - logq_now_C), weight_C
