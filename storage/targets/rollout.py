"""Rollouts: the log-prob each sampled token had under the policy that drew it, for a store built over the
student's own generations (`teacher-cache build --dataset ROLLOUTS`, where ROLLOUTS is a `teacher-cache generate`
output written with the teacher's tokenizer; manifest section `rollout`).

One array, `behaviour_logprob` [S, L]: at position t, the log-prob of token t+1 under the distribution the generator
drew it from (its temperature, top-k and top-p applied), NaN where token t+1 was not drawn by the generator (prompt
and template tokens, an EOS appended after a truncated reply, padding) or belongs to a rollout that began in an
earlier packed sample (read there without the start it was drawn after). With the teacher's `true_logprob` of the same
token it gives the per-token advantage and importance weight of the on-policy reverse-KL estimator
(`student_train` loss `rollout_rkl`). Not a distribution of the teacher, so ensembles drop it.
"""

from __future__ import annotations

import numpy as np
import torch

from storage.layout import ArraySpec
from storage.targets.base import TargetKind

BEHAVIOUR_LOGPROB = "behaviour_logprob"


def section(generated_by: dict) -> dict:
    """The manifest's `rollout` section: what the behaviour log-probs are, and the generation they come from."""
    return {"behaviour": "sampling distribution", "generated_by": generated_by}


class Rollout(TargetKind):
    name = "rollout"
    section = "rollout"

    def array_specs(self, targets: dict, *, vocab_size: int, format_version: int) -> list[ArraySpec]:
        return [ArraySpec(BEHAVIOUR_LOGPROB, ("S", "L"), np.dtype(np.float32), "shuffle_zstd",
                          "log-prob of token t+1 under the distribution the generator drew it from; NaN where it "
                          "was not drawn (prompt, appended EOS, padding) or its rollout began in an earlier sample")]

    def describe(self, targets: dict) -> str:
        model = targets["rollout"].get("generated_by", {}).get("model", "?")
        return f"rollout: behaviour log-probs of the tokens {model} drew"

    def collate(self, record: dict[str, np.ndarray], targets: dict) -> dict[str, torch.Tensor]:
        return {BEHAVIOUR_LOGPROB: torch.from_numpy(record[BEHAVIOUR_LOGPROB].astype(np.float32))}

    def mixed_note(self) -> str:
        return ("rollout stores hold the behaviour log-probs of the tokens a generator drew, which other stores lack; "
                "concatenate rollout stores only with rollout stores")


ROLLOUT = Rollout()
