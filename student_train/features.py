"""Feature distillation: the student's hidden states pulled towards the teacher's, as stored by `--hidden-layers`.

Sits beside `student_train.losses` in the trainer: a store built with `teacher-cache build --hidden-layers` holds
the teacher's hidden states of some layers (`hidden_states_{n}`, n an index into the teacher's hidden-state tuple:
0 = embeddings, n = after block n). A layer map pairs student hidden-state indices with those teacher indices;
each pair's student states go through a learned linear projection when the widths differ (the identity when they
match, unless projections are forced) and are compared with the teacher's:

    feature = mean over pairs of (mean over loss_mask positions of mse(P(s), t) or 1 - cos(P(s), t))

mse is the mean over hidden dimensions of the squared difference. Everything is fp32; the stored fp16 states are
read as fp32 by the loader. The projections (`FeatureProjector`) train with the student, live in its checkpoints
and never in the saved student model.

Legend: B batch, L positions per row, H student hidden size, G teacher hidden size, P trained positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from storage.manifest import Manifest
from storage.targets.hidden import hidden_array_name

BUILD_OPTION = "teacher-cache build --hidden-layers"
PROJECTIONS = ("auto", "always")


def _mse_P(student_PG: torch.Tensor, teacher_PG: torch.Tensor) -> torch.Tensor:
    return (student_PG - teacher_PG).square().mean(-1)


def _cosine_P(student_PG: torch.Tensor, teacher_PG: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(student_PG, teacher_PG, dim=-1)


# Per-position feature distances, chosen by --feature-loss.
FEATURE_LOSSES = {"mse": _mse_P, "cosine": _cosine_P}


def parse_layer_map(value: str | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Pairs (student index, teacher index) from "S:T,S:T" or a list of [S, T].

    Raises:
        ValueError: anything else, or no pair.
    """
    items = [item.split(":") for item in value.split(",")] if isinstance(value, str) else value
    try:
        pairs = [tuple(int(part) for part in item) for item in items]
    except (TypeError, ValueError):
        pairs = []
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--feature-layers {value}: expected STUDENT:TEACHER hidden-state indices separated by "
                         "commas, e.g. 1:2,2:4 (0 = embeddings, -1 = last).")
    return pairs


def uniform_layer_map(teacher_layers: Sequence[int], teacher_depth: int, student_depth: int) -> list[tuple[int, int]]:
    """Each teacher index paired with the student index at the same relative depth, rounded half up.

    Depths count blocks (`num_hidden_layers`); indices run from 0 (embeddings) to the depth (the last block).
    """
    return [((2 * t * student_depth + teacher_depth) // (2 * teacher_depth), t) for t in teacher_layers]


def resolve_layer_map(
    pairs: Sequence[tuple[int, int]] | None, *, stored: Sequence[int], teacher_depth: int, student_depth: int
) -> list[tuple[int, int]]:
    """The (student, teacher) pairs to train, indices made non-negative; None: `uniform_layer_map` of `stored`.

    Args:
        pairs: the pairs of --feature-layers, or None.
        stored: the teacher hidden-state indices the store holds.
        teacher_depth: the teacher's `num_hidden_layers`.
        student_depth: the student's `num_hidden_layers`.

    Raises:
        ValueError: the store holds no hidden states, an index is out of range, or a teacher layer is not stored.
    """
    if not stored:
        raise ValueError(f"--feature-loss: the store holds no teacher hidden states; build it with `{BUILD_OPTION} "
                         f"1,-1` (any layers), or train without --feature-loss.")
    if pairs is None:
        return uniform_layer_map(stored, teacher_depth, student_depth)
    resolved = []
    for student, teacher in pairs:
        for who, index, depth in (("student", student, student_depth), ("teacher", teacher, teacher_depth)):
            if not -(depth + 1) <= index <= depth:
                raise ValueError(f"--feature-layers {student}:{teacher}: the {who} has {depth + 1} hidden states, "
                                 f"0 (embeddings) .. {depth} (last block), or -{depth + 1}..-1 from the end.")
        resolved.append((student % (student_depth + 1), teacher % (teacher_depth + 1)))
    missing = sorted({teacher for _, teacher in resolved if teacher not in stored})
    if missing:
        raise ValueError(f"--feature-layers: teacher layer(s) {', '.join(map(str, missing))} are not in the store, "
                         f"which holds layers {', '.join(map(str, stored))}; map to those, or rebuild the store "
                         f"with `{BUILD_OPTION} {','.join(map(str, sorted({*stored, *missing})))}`.")
    return resolved


class FeatureProjector(nn.Module):
    """The feature loss of a run and its projections, one per (student layer, teacher layer) pair.

    Its parameters train with the student (in the same optimizer) and are saved in checkpoints only. The layer map
    and the loss travel in its state dict, so a checkpoint cannot be resumed with another map.

    Args:
        layer_map: (student index, teacher index) pairs, non-negative.
        kind: a key of FEATURE_LOSSES.
        student_width: the student's hidden size H.
        teacher_width: the teacher's hidden size G.
        project: "auto" (a projection only when H != G) or "always".
    """

    def __init__(self, layer_map: Sequence[tuple[int, int]], *, kind: str, student_width: int, teacher_width: int,
                 project: str = "auto"):
        super().__init__()
        self.layer_map = [(int(s), int(t)) for s, t in layer_map]
        self.kind = kind
        linear = project == "always" or student_width != teacher_width
        self.projections = nn.ModuleList(
            nn.Linear(student_width, teacher_width) if linear else nn.Identity() for _ in self.layer_map)

    def forward(self, student_states: Sequence[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The feature loss (a scalar, fp32) of a batch.

        Args:
            student_states: the student's hidden-state tuple, [B, L, H] each (0 = embeddings), as the model returns
                it with `output_hidden_states=True`.
            batch: a collated batch holding `loss_mask` [B, L] and `hidden_states_{t}` [B, L, G] of each mapped t.
        """
        mask_BL = batch["loss_mask"].to(student_states[0].device)
        positions = max(int(mask_BL.sum()), 1)
        distance = FEATURE_LOSSES[self.kind]
        losses = []
        for (s, t), projection in zip(self.layer_map, self.projections, strict=True):
            student_PG = projection(student_states[s][mask_BL].float())
            teacher_PG = batch[hidden_array_name(t)].to(mask_BL.device)[mask_BL].float()
            losses.append(distance(student_PG, teacher_PG).sum() / positions)
        return torch.stack(losses).mean()

    def get_extra_state(self) -> dict:
        return {"layer_map": [list(pair) for pair in self.layer_map], "kind": self.kind}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"the checkpoint's feature loss is {state['kind']} over the layer map (student, teacher) "
                             f"{state['layer_map']}, this run's is {mine['kind']} over {mine['layer_map']}; resume "
                             "with the run's --feature-loss and --feature-layers.")


def build_feature_head(manifest: Manifest, model_config, *, kind: str, layer_map: Sequence[tuple[int, int]] | None,
                       project: str, seed: int) -> FeatureProjector:
    """The `FeatureProjector` of a student (its HF config) on a store, projections initialised from `seed`.

    Raises:
        ValueError: see `resolve_layer_map`.
    """
    hidden = manifest.targets.get("hidden_states", {})
    pairs = resolve_layer_map(layer_map, stored=hidden.get("layers", []),
                              teacher_depth=manifest.teacher["num_hidden_layers"],
                              student_depth=model_config.num_hidden_layers)
    with torch.random.fork_rng(devices=[]):  # the same init whatever the student's init consumed
        torch.manual_seed(seed)
        return FeatureProjector(pairs, kind=kind, student_width=model_config.hidden_size,
                                teacher_width=hidden["hidden_size"], project=project)
