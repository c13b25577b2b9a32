"""What the student side of a target kind provides: the representations that read it (`student_train.divergences`),
which of them a store of the kind trains with by default, and the check that a store holds what a representation
reads, with the build command that makes one."""

from __future__ import annotations

from storage.targets import KINDS


class StudentKind:
    """The student side of a target kind (the same name as its `storage.targets` kind).

    Attributes:
        name: the kind's name.
        representations: the `--targets-from` representations that read the kind's records.
        default: the representation a store of this kind trains with unless `--targets-from` says otherwise.
    """

    name: str
    representations: tuple[str, ...]
    default: str

    def present(self, targets: dict) -> bool:
        """Whether a store with the manifest section `targets` holds this kind."""
        return KINDS[self.name].present(targets)

    def check(self, representation: str, targets: dict) -> None:
        """Refuse a store that lacks what `representation` (one of `representations`) reads.

        Raises:
            ValueError: naming the store to build or the representation to use instead.
        """
        raise NotImplementedError
