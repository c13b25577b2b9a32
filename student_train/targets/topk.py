"""The student side of top-k + tail targets: `topk_tail` (the default), `topk_renorm` and `topk_residual` read
them, and `--top-k` narrows them to the K most probable of the stored ids."""

from __future__ import annotations

from student_train.targets.base import StudentKind


class TopK(StudentKind):
    name = "topk"
    representations = ("topk_tail", "topk_renorm", "topk_residual")
    # Across tokenizers: the stored top-k, mapped to the student's ids or sorted (`student_train.cross_losses`).
    cross_representations = ("mapped", "sorted")
    default = "topk_tail"

    def check(self, representation: str, targets: dict) -> None:
        if not self.present(targets):
            raise ValueError(f"--targets-from {representation}: reads the store's top-k targets, and this store has "
                             "none; build one with `teacher-cache build --targets topk`, or use --targets-from "
                             "sampled.")

    def check_top_k(self, top_k: int | None, targets: dict) -> None:
        """--top-k must name at most as many ids as the store's top-k record holds.

        Raises:
            ValueError: the store has no top-k record, or fewer ids than `top_k`.
        """
        if top_k is None:
            return
        if not self.present(targets):
            raise ValueError(f"--top-k {top_k}: the store holds no top-k targets to choose from; build one with "
                             f"`teacher-cache build --targets topk --top-k {top_k}`, or leave --top-k out.")
        if top_k > (stored := targets["topk"]["k"]):
            raise ValueError(f"--top-k {top_k}: the store holds the top-{stored} ids of each position; choose --top-k "
                             f"{stored} or fewer, or a store built with `teacher-cache build --top-k {top_k}`.")


TOPK = TopK()
