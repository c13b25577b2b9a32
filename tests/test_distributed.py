"""Training on 2 CPU processes under torchrun (gloo): each rank reads its own samples, the loss curve is a single
process's with the same global batch, FSDP2's is DDP's, a resumed run continues exactly, and a run is refused on
another number of processes than its checkpoint's.

One torchrun launch runs every 2-process training of this file, one after the other in the same processes (each
launch costs two interpreters importing torch and transformers): this file is also the launched script, see
`_worker`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_small_store, make_student_config
from transformers import AutoModelForCausalLM

from student_train.checkpoint import OPTIMIZER, read_state_file
from student_train.cli import main
from student_train.config import TrainConfig
from student_train.distributed import World
from student_train.loader import LoaderConfig, StoreLoader
from student_train.train import Trainer

STEPS, PER_RANK, ACCUM = 6, 2, 2  # global batch 2 x 2 x 2 = 8 samples per step; 38 training samples
EVAL_FRACTION = 0.2
TOLERANCE = dict(rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    root = tmp_path_factory.mktemp("dist-store")
    # One padded document per sample: the ranks' batches hold different numbers of trained tokens.
    return make_small_store(root, llama_dir, corpus_texts[:48], pack=False)


@pytest.fixture(scope="module")
def student(tmp_path_factory, llama_dir) -> Path:
    path = tmp_path_factory.mktemp("dist-student")
    make_student_config(path, llama_dir, layers=2)
    return path


def _args(store: Path, student: Path, output: Path, *extra: str, batch_size: int = PER_RANK) -> list[str]:
    return ["--store", str(store), "--student", str(student), "--output", str(output), "--batch-size",
            str(batch_size), "--grad-accum", str(ACCUM), "--max-steps", str(STEPS), "--lr", "1e-2",
            "--eval-fraction", str(EVAL_FRACTION), "--eval-every", "3", "--save-every", "3", "--log-every", "1",
            "--device", "cpu", "--precision", "fp32", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, store, student) -> Path:
    """Every 2-process run, in one torchrun launch: DDP and FSDP, each whole, and cut before step 4 (after the step-3
    checkpoint) then resumed."""
    root = tmp_path_factory.mktemp("dist-runs")
    plan = []
    for mode in ("ddp", "fsdp"):
        args = _args(store, student, root / mode, "--distributed", mode)
        cut = _args(store, student, root / f"{mode}-cut", "--distributed", mode)
        plan += [{"args": args, "record": str(root / f"{mode}-ids")},
                 {"args": cut, "stop_before_step": 4}, {"args": [*cut, "--resume"]}]
    (root / "plan.json").write_text(json.dumps(plan))
    # No timeout: the runs end by themselves however slow a loaded machine makes them, and a rank stuck in a
    # collective fails after the process group's own timeout.
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
         str(root / "plan.json")], capture_output=True, text=True)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-6000:]
    return root


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, store, student) -> Path:
    """The same training in a single process, with the same global batch."""
    output = tmp_path_factory.mktemp("dist-single") / "run"
    result = CliRunner().invoke(main, _args(store, student, output, batch_size=2 * PER_RANK))
    assert result.exit_code == 0, result.output
    return output


def _metrics(output: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval" not in r], [r["eval"] for r in lines if "eval" in r]


def _assert_same_curves(output_a: Path, output_b: Path) -> None:
    (train_a, eval_a), (train_b, eval_b) = _metrics(output_a), _metrics(output_b)
    assert [r["step"] for r in train_a] == [r["step"] for r in train_b] == list(range(1, STEPS + 1))
    for a, b in zip(train_a, train_b, strict=True):
        for key in ("loss", "kd", "ce", "forward_kl", "kd_scale", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], **TOLERANCE), (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"]
    assert [e["step"] for e in eval_a] == [e["step"] for e in eval_b] == [3, STEPS]
    for a, b in zip(eval_a, eval_b, strict=True):
        assert a["tokens"] == b["tokens"] > 0
        for key in ("lm_loss", "kl", "top1_agreement"):
            assert a[key] == pytest.approx(b[key], **TOLERANCE), (a["step"], key)
    # Adam's steps are ~lr per weight whatever the gradient's size, so weights of tiny gradients keep float noise:
    # 1e-4 is 1% of one step at lr 1e-2.
    model_a = AutoModelForCausalLM.from_pretrained(output_a).state_dict()
    model_b = AutoModelForCausalLM.from_pretrained(output_b).state_dict()
    for name, value in model_a.items():
        torch.testing.assert_close(model_b[name], value, rtol=1e-3, atol=1e-4)


def test_each_rank_reads_its_own_samples(two_ranks, store):
    """Rank r's micro-batches are the r-th halves of the single process's batches of twice the size: no sample is
    read twice in an epoch, every training sample once, and none of the held-out ones."""
    ranks = [json.loads((two_ranks / f"ddp-ids.rank{r}.json").read_text()) for r in range(2)]
    assert [len(batches) for batches in ranks] == [STEPS * ACCUM] * 2
    single = StoreLoader(LoaderConfig(store=str(store), batch_size=2 * PER_RANK, seed=3,
                                      exclude_fraction_from_end=EVAL_FRACTION))
    per_epoch = len(single)
    expected = [batch["sample_ids"].tolist() for _, batch in zip(range(STEPS * ACCUM), _forever(single), strict=False)]
    for index, (ids_0, ids_1) in enumerate(zip(*ranks, strict=True)):
        assert len(ids_0) == len(ids_1) == PER_RANK
        assert ids_0 + ids_1 == expected[index], index
    first_epoch = [i for batches in ranks for ids in batches[:per_epoch] for i in ids]
    num_train = single.order.num_samples
    assert len(first_epoch) == len(set(first_epoch)) == per_epoch * 2 * PER_RANK > num_train - 2 * PER_RANK
    assert set(first_epoch) <= set(range(num_train))


def _forever(loader):
    while True:
        yield from loader


def test_two_ranks_follow_the_single_process_curve(two_ranks, one_rank):
    _assert_same_curves(two_ranks / "ddp", one_rank)


def test_fsdp_follows_ddp(two_ranks):
    _assert_same_curves(two_ranks / "fsdp", two_ranks / "ddp")
    # Its checkpoints are whole, in the single-process format.
    last = two_ranks / "fsdp" / "checkpoints" / f"step-{STEPS:07d}"
    checkpoint = AutoModelForCausalLM.from_pretrained(last / "model")
    final = AutoModelForCausalLM.from_pretrained(two_ranks / "fsdp").state_dict()
    for name, value in checkpoint.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0)
    optimizer = read_state_file(last / OPTIMIZER)
    assert {tuple(state["exp_avg"].shape) for state in optimizer["optimizer"]["state"].values()} == {
        tuple(p.shape) for p in checkpoint.parameters()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_continues_exactly(two_ranks, mode):
    cut, _ = _metrics(two_ranks / f"{mode}-cut")
    whole, _ = _metrics(two_ranks / mode)
    assert [r["step"] for r in cut] == list(range(1, STEPS + 1))
    for a, b in zip(whole, cut, strict=True):
        for key in ("loss", "kd", "ce", "grad_norm", "lr", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    _assert_same_curves(two_ranks / mode, two_ranks / f"{mode}-cut")


def test_resume_on_another_number_of_processes_is_refused(two_ranks, one_rank, store, student):
    result = CliRunner().invoke(main, [*_args(store, student, two_ranks / "ddp-cut"), "--resume"])
    assert result.exit_code == 2
    assert "written by a run on 2 process(es) and this run has 1" in result.output
    assert "torchrun --nproc-per-node 2" in result.output
    config = TrainConfig(**{**json.loads((one_rank / "train_config.json").read_text()), "resume": True})
    with pytest.raises(ValueError, match=r"on 1 process\(es\) and this run has 2"):
        Trainer(config, World(rank=0, world_size=2))


def test_ranks_without_a_batch_are_refused(tmp_path, store, student):
    config = TrainConfig(store=str(store), student=str(student), output=str(tmp_path / "run"), batch_size=40,
                         eval_fraction=EVAL_FRACTION, device="cpu")
    with pytest.raises(ValueError, match=r"leaving \d+ for training, fewer than one batch of --batch-size 40 on "
                                         r"each of 2 ranks"):
        Trainer(config, World(rank=1, world_size=2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interleaved_loader_shares_an_evaluation(store, num_workers):
    """rank r of W reads batches r, r + W, ... of the single-rank order: every sample once, ranks one batch apart."""
    config = LoaderConfig(store=str(store), batch_size=3, shuffle=False, drop_last=False, num_workers=num_workers,
                          only_fraction_from_end=0.5)
    single = [batch["sample_ids"].tolist() for batch in StoreLoader(config)]
    for world_size in (2, 3):
        loaders = [StoreLoader(config, rank=r, world_size=world_size, interleave=True) for r in range(world_size)]
        for rank, loader in enumerate(loaders):
            batches = [batch["sample_ids"].tolist() for batch in loader]
            assert batches == single[rank::world_size] and len(loader) == len(batches)


def _worker(plan_path: str) -> None:
    """Under torchrun: run each training of the plan through the CLI, in one process group.

    A run may record the sample ids of each micro-batch its rank trained on ("record": the path prefix of one JSON
    file per rank), or be interrupted before an optimizer step ("stop_before_step") as a crash would.
    """
    import click
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    batches, train_step = Trainer._batches, Trainer._train_step
    for run in json.loads(Path(plan_path).read_text()):
        seen = []

        def recorded(self, seen=seen):
            for batch in batches(self):
                seen.append(batch["sample_ids"].tolist())
                yield batch

        def stopping(self, micro, run=run):
            if self.step + 1 == run.get("stop_before_step"):
                raise KeyboardInterrupt
            return train_step(self, micro)

        Trainer._batches, Trainer._train_step = recorded, stopping
        try:
            main(run["args"], standalone_mode=False)
        except click.exceptions.Abort:  # what click makes of the KeyboardInterrupt
            assert "stop_before_step" in run
        if "record" in run:
            Path(f"{run['record']}.rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
