"""What `distill-rounds` reports of a round (`tools.rounds`): its rollouts, the teacher tokens it cost, the student's
held-out metrics and the teacher's log-likelihood of the student's own samples; and the table of all rounds.

Everything is read back from the round's committed outputs (a generate output's rows, a store's manifest and
per-sample statistics, the student's final_metrics.json), so a summary written after a resume equals that of an
uninterrupted run, wall times apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from storage.fs import Location
from storage.generated import load_manifest, read_generated
from storage.reader import Store


def rollout_stats(rollouts: Path) -> dict:
    """Prompts answered, responses, their mean length in tokens and the share cut at --max-new-tokens."""
    rows, manifest = read_generated(rollouts)
    table = rows.data.table
    lengths = pc.list_value_length(table.column("response_token_ids")).to_numpy()
    truncated = pc.equal(table.column("finish_reason"), "length").to_numpy(zero_copy_only=False)
    return {"prompts": manifest["counts"]["prompts"], "responses": manifest["rows"],
            "mean_tokens": float(lengths.mean()), "truncated_share": float(truncated.mean())}


def trained_tokens(store: Path) -> int:
    """The teacher tokens a store holds targets for: its trained (loss-mask) positions."""
    return Store(store).manifest.num_tokens


def teacher_loglik(store: Path, rollouts: Path) -> dict:
    """The teacher's log-likelihood of the responses of `rollouts`, from the store built over them: the mean of
    `true_logprob` over the trained positions (the per-sample statistics hold each sample's mean negative log-prob
    and trained positions), and its sum over the trained tokens shared by the responses."""
    stats = Store(store).stats()
    tokens_S = stats["stats_num_tokens"].astype(np.int64)
    # A sample without trained positions has a NaN mean; it adds nothing.
    total = -float(np.where(tokens_S > 0, stats["stats_nll"].astype(np.float64) * tokens_S, 0.0).sum())
    responses = load_manifest(Location(rollouts))["rows"]
    tokens = int(tokens_S.sum())
    return {"responses": responses, "tokens": tokens, "per_token": total / tokens, "per_response": total / responses}


def held_out_metrics(train: Path) -> dict:
    """The student's final held-out evaluation (lm_loss, kl, top1_agreement, tokens, step)."""
    return json.loads((train / "final_metrics.json").read_text())


COLUMNS = ("round", "responses", "mean len", "truncated", "teacher tokens", "cumulative", "held-out loss", "KL",
           "teacher logp/token", "teacher logp/response", "seconds")


def format_table(summaries: list[dict]) -> str:
    """A Markdown table with a row per summary: the initial student's evaluation, then each round."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    for summary in summaries:
        rollouts, held_out = summary.get("rollouts", {}), summary.get("held_out", {})
        loglik, tokens = summary["teacher_loglik"] or {}, summary["teacher_tokens"]
        cells = [str(summary["round"]), _number(rollouts.get("responses")), _number(rollouts.get("mean_tokens"), 1),
                 _share(rollouts.get("truncated_share")), _number(tokens["round"]), _number(tokens["cumulative"]),
                 _number(held_out.get("lm_loss"), 3), _number(held_out.get("kl"), 3),
                 _number(loglik.get("per_token"), 3), _number(loglik.get("per_response"), 2),
                 _number(summary["seconds_total"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | int | None, digits: int = 0) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}" if digits else f"{value:,}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"
