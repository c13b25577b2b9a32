"""The student side of sampled targets: the `sampled` representation reads the draws of the whole distribution
(not a hybrid store's tail draws, whose empirical distribution is not the teacher's)."""

from __future__ import annotations

from storage.targets.sampled import draws_from_tail
from student_train.targets.base import StudentKind


class Sampled(StudentKind):
    name = "sampled"
    representations = ("sampled",)
    default = "sampled"

    def check(self, representation: str, targets: dict) -> None:
        if draws_from_tail(targets):
            raise ValueError("--targets-from sampled: this store's draws are of the teacher's tail only (ids outside "
                             "its top-k), whose empirical distribution is not the teacher's; use --targets-from hybrid "
                             "(the store's default), which adds the exact top-k head to them.")
        if not self.present(targets):
            raise ValueError("--targets-from sampled: reads the teacher's draws, and this store has none; build one "
                             "with `teacher-cache build --targets sampled`, or use --targets-from topk_tail.")


SAMPLED = Sampled()
