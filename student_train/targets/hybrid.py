"""The student side of hybrid targets: the `hybrid` representation (the exact top-k head plus the tail draws) reads
them, and is a hybrid store's default."""

from __future__ import annotations

from student_train.targets.base import StudentKind


class Hybrid(StudentKind):
    name = "hybrid"
    representations = ("hybrid",)
    default = "hybrid"

    def check(self, representation: str, targets: dict) -> None:
        if not self.present(targets):
            raise ValueError("--targets-from hybrid: reads the exact top-k plus draws from the teacher's tail (the ids "
                             "outside the top-k), and this store has no tail draws"
                             + (" (its draws are not conditioned on the tail: they train with --targets-from sampled)"
                                if "sampled" in targets else "")
                             + "; build one with `teacher-cache build --targets hybrid`.")


HYBRID = Hybrid()
