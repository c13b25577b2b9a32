"""`benchmarks/quality.py` on a tiny teacher and student, a few steps per row and two seeds: the report's rows
exist with finite numbers, and the figures it rests on match independent brute-force computations.

- The online row's first training step, in each seed: its KD loss is KL(teacher || student) of the two models' own
  full forwards (`model(...).logits`) over that seed's first batch, with the student at that seed's init.
- The CE row's held-out LM loss: a plain forward of the saved student over every held-out sample.
- Each row's mean and spread over the seeds, its gap share and times relative to CE, recomputed by hand from the
  per-seed entries of the JSON.
- With --student-init, the student is the teacher's kept layers: the CE run's first loss is that of the teacher
  with its other layers removed by hand.
- A second run with the same options reuses every store, run and evaluation.

Legend: B batch, L positions, V vocabulary.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import load_benchmark, make_student_config, write_jsonl
from torch.special import xlogy
from transformers import AutoConfig, AutoModelForCausalLM

from storage.reader import Store
from student_train.loader import LoaderConfig, StoreLoader

STEPS, BATCH, SEQ_LEN, ALPHA = 2, 2, 32, 0.8
SEEDS = (4, 5)


quality = load_benchmark("quality")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_dir, corpus_texts) -> dict:
    root = tmp_path_factory.mktemp("quality")
    student = make_student_config(root / "student", llama_dir)
    return {"root": root, "student": student, "args": [
        "--teacher", str(llama_dir), "--student-config", str(student),
        "--train-data", str(write_jsonl(root / "train.jsonl", corpus_texts[:30])),
        "--heldout-data", str(write_jsonl(root / "heldout.jsonl", corpus_texts[100:110])),
        "--output", str(root / "out"), "--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN),
        "--alpha", str(ALPHA), "--seeds", ",".join(map(str, SEEDS)), "--lr", "1e-2", "--heldout-samples", "4",
        "--eval-every", "1", "--save-every", str(STEPS), "--chunk-positions", "64", "--device", "cpu"]}


@pytest.fixture(scope="module")
def report(setup) -> dict:
    result = CliRunner().invoke(quality.main, setup["args"])
    assert result.exit_code == 0, result.output
    assert "| online full KD |" in result.output
    return json.loads((setup["root"] / "out" / "quality.json").read_text())


def test_every_row_is_reported_with_finite_numbers(setup, report):
    out = setup["root"] / "out"
    assert [row["name"] for row in report["rows"]] == [row.name for row in quality.ROWS]
    for row in report["rows"]:
        for key in ("lm_loss", "ece", "kl_to_teacher", "top1_agreement", "wall_s", "train_tokens_per_s"):
            assert math.isfinite(row[key]), (row["name"], key)
        assert row["tokens"] == report["teacher"]["tokens"] > 0
        assert [step for step, _ in row["curves"]["heldout"]] == list(range(1, STEPS + 1))
        assert [entry["seed"] for entry in row["per_seed"]] == list(SEEDS)
        for seed in SEEDS:
            assert (out / "runs" / f"seed-{seed}" / row["name"] / "model.safetensors").exists()
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["topk_renorm_k8"]["options"]["top_k"] == 8
    assert by_name["online"]["options"]["online_teacher"] == report["setup"]["teacher"]
    assert report["setup"]["tokens_per_run"] == STEPS * BATCH * SEQ_LEN
    assert report["machine"]["cpu_cores"] and (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "| top-64 + tail |" in (out / "quality.md").read_text()
    assert (out / "quality_bytes.png").read_bytes()[:4] == b"\x89PNG"


def test_hybrid_rows_train_on_their_own_stores(setup, report):
    out = setup["root"] / "out"
    for row in (r for r in quality.ROWS if r.name.startswith("hybrid")):
        spec = quality.STORES[row.store]
        targets = Store(out / "stores" / row.store).manifest.targets
        assert targets["sampled"]["draws_from"] == "tail"
        assert (targets["topk"]["k"], targets["sampled"]["num_draws"]) == (spec.top_k, spec.num_draws)
        ran = next(r for r in report["rows"] if r["name"] == row.name)
        assert ran["options"]["targets_from"] == "hybrid" and ran["options"]["store"].endswith(row.store)


def test_systematic_rows_train_on_stores_of_systematic_draws(setup, report):
    """Each row of draws reads a store of its scheme: `*_systematic` rows systematic draws, the others multinomial
    ones (no `draw_scheme` in the manifest, as every store built before the option)."""
    out = setup["root"] / "out"
    drawn = [row for row in quality.ROWS if row.options.get("targets_from") in ("sampled", "hybrid")]
    assert sum(row.name.endswith("_systematic") for row in drawn) == 3
    for row in drawn:
        sampled = Store(out / "stores" / row.store).manifest.targets["sampled"]
        assert sampled.get("draw_scheme") == ("systematic" if row.name.endswith("_systematic") else None), row.name
        ran = next(r for r in report["rows"] if r["name"] == row.name)
        assert ran["options"]["store"].endswith(row.store) and math.isfinite(ran["lm_loss"])


def test_target_bytes_are_the_files_on_disk(setup, report):
    """A row that reads a whole record is charged the record's files; fewer kept ids cost fewer bytes."""
    out = setup["root"] / "out"
    by_name = {row["name"]: row for row in report["rows"]}

    def on_disk(store: str, names: tuple[str, ...]) -> float:
        size = sum(path.stat().st_size for path in (out / "stores" / store / "shards").glob("shard-*/*/**/*")
                   if path.is_file() and path.relative_to(out / "stores" / store / "shards").parts[1] in names)
        return size / Store(out / "stores" / store).manifest.num_tokens

    topk = ("topk_ids", "topk_logprob_floor", "topk_logprob_excess", "tail_logmass")
    sampled = ("sampled_nunique", "sampled_offsets", "sampled_ids", "sampled_counts")
    assert by_name["topk_tail_k64"]["target_bytes_per_token"] == pytest.approx(on_disk("main", topk))
    assert by_name["sampled_n50"]["target_bytes_per_token"] == pytest.approx(on_disk("main", sampled))
    assert by_name["hybrid_k8_n16"]["target_bytes_per_token"] == pytest.approx(
        on_disk("hybrid_k8_n16", topk + sampled))
    k8, k64 = (by_name[f"topk_renorm_k{k}"]["target_bytes_per_token"] for k in (8, 64))
    assert 0 < k8 < k64
    assert by_name["ce"]["target_bytes_per_token"] is None and by_name["online"]["target_bytes_per_token"] is None


@pytest.mark.parametrize("seed", SEEDS)
def test_online_first_step_is_the_dense_kl(setup, report, llama_dir, seed):
    """The seed gives the student's init and the data order: each seed's first step is the dense KL of its own."""
    out = setup["root"] / "out"
    first = json.loads((out / "runs" / f"seed-{seed}" / "online" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    loader = StoreLoader(LoaderConfig(store=str(out / "stores" / "main"), batch_size=BATCH, seed=seed))
    batch = next(iter(loader))
    torch.manual_seed(seed)  # the student's random init, as training makes it
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(setup["student"]), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    inputs = {"input_ids": batch["input_ids"][:, :-1], "attention_mask": batch["attention_mask"][:, :-1].long()}
    mask = batch["loss_mask"]
    with torch.no_grad():
        p = teacher(**inputs).logits.double().softmax(-1)[mask]
        logits = student(**inputs).logits.double()[mask]
    kl = (xlogy(p, p) - p * logits.log_softmax(-1)).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    assert first["forward_kl"] == pytest.approx(float(kl), rel=1e-4)
    assert first["loss"] == pytest.approx(float(ALPHA * kl + (1 - ALPHA) * ce), rel=1e-4)


def test_ce_heldout_loss_is_the_saved_students_mean_nll(setup, report):
    out = setup["root"] / "out"
    heldout = Store(out / "stores" / "heldout")
    ce_run = out / "runs" / f"seed-{SEEDS[1]}" / "ce"
    for name, path in (("ce", ce_run), ("teacher", Path(report["setup"]["teacher"]))):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        total, count = 0.0, 0
        for i in range(len(heldout)):
            sample = heldout[i]
            ids = torch.from_numpy(sample["input_ids"].astype("int64"))
            with torch.no_grad():
                logp = model(ids[None, :-1]).logits[0].double().log_softmax(-1)
            mask = torch.from_numpy(sample["loss_mask"])
            total -= float(logp.gather(1, ids[1:, None])[:, 0][mask].sum())
            count += int(mask.sum())
        ce_row = next(r for r in report["rows"] if r["name"] == "ce")
        expected = ce_row["per_seed"][1] if name == "ce" else report["teacher"]
        assert expected["lm_loss"] == pytest.approx(total / count, rel=1e-4), name
        assert expected["tokens"] == count


def test_second_run_reuses_everything_and_refuses_other_options(setup, report):
    out = setup["root"] / "out"
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json*")}
    result = CliRunner().invoke(quality.main, [*setup["args"], "--rows", "sampled_n50"])
    assert result.exit_code == 0, result.output
    assert result.output.count("reused the finished run") == 6  # ce, sampled, online, in each seed
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json*")} == mtimes
    again = json.loads((out / "quality.json").read_text())
    assert [row["name"] for row in again["rows"]] == ["ce", "sampled_n50", "online"]
    for row in again["rows"]:
        old = next(r for r in report["rows"] if r["name"] == row["name"])
        assert (row["lm_loss"], row["wall_s"]) == (old["lm_loss"], old["wall_s"])

    # One of the seeds alone: its runs are reused, and its figures are that seed's (no spread).
    result = CliRunner().invoke(quality.main, [*setup["args"], "--rows", "sampled_n50", "--seeds", str(SEEDS[1])])
    assert result.exit_code == 0 and result.output.count("reused the finished run") == 3, result.output
    alone = json.loads((out / "quality.json").read_text())
    for row in alone["rows"]:
        old = next(r for r in report["rows"] if r["name"] == row["name"])["per_seed"][1]
        assert (row["lm_loss"], row["wall_vs_ce"], row["spread"]["lm_loss"]) == (old["lm_loss"], old["wall_vs_ce"], 0)

    result = CliRunner().invoke(quality.main, [*setup["args"], "--lr", "2e-2"])
    assert result.exit_code == 2 and "other options (lr)" in result.output, result.output
    result = CliRunner().invoke(quality.main, [*setup["args"], "--rows", "topk9"])
    assert result.exit_code == 2 and "unknown row(s) topk9" in result.output
    for seeds, message in (("4,4", "distinct seeds"), ("4,x", "integers separated by commas"), ("-1", ">= 0")):
        result = CliRunner().invoke(quality.main, [*setup["args"], "--seeds", seeds])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, seeds
    result = CliRunner().invoke(quality.main, [*setup["args"], "--student-init", "0"])
    assert result.exit_code == 2 and "--student-config or --student-init: give one" in result.output


def test_mean_and_spread_are_those_of_the_seeds(report):
    """Every aggregated figure of a row is the mean of its two seeds' and half their difference; each seed's gap
    share is against that seed's CE and online losses, each seed's times against that seed's CE run."""
    by_name = {row["name"]: row for row in report["rows"]}
    ce, online = by_name["ce"]["per_seed"], by_name["online"]["per_seed"]
    gaps = [ce[i]["lm_loss"] - online[i]["lm_loss"] for i in range(2)]
    assert report["gaps"] == pytest.approx({str(seed): gap for seed, gap in zip(SEEDS, gaps, strict=True)})
    assert report["gap"] == pytest.approx((gaps[0] + gaps[1]) / 2)
    assert ce[0]["lm_loss"] != ce[1]["lm_loss"]  # another init and order: another student
    for row in report["rows"]:
        a, b = row["per_seed"]
        for i, entry in enumerate((a, b)):
            assert entry["wall_vs_ce"] == pytest.approx(entry["wall_s"] / ce[i]["wall_s"])
            speed = entry["train_tokens_per_s"] / ce[i]["train_tokens_per_s"]
            assert entry["tokens_per_s_vs_ce"] == pytest.approx(speed)
            share = (ce[i]["lm_loss"] - entry["lm_loss"]) / gaps[i] if gaps[i] > 0 else None
            assert entry["gap_share"] == (None if share is None else pytest.approx(share)), row["name"]
            kl_gap = ce[i]["kl_to_teacher"] - online[i]["kl_to_teacher"]
            kl_share = (ce[i]["kl_to_teacher"] - entry["kl_to_teacher"]) / kl_gap if kl_gap > 0 else None
            assert entry["kl_gap_share"] == (None if kl_share is None else pytest.approx(kl_share)), row["name"]
        for key in ("lm_loss", "ece", "kl_to_teacher", "top1_agreement", "wall_s", "wall_vs_ce", "gap_share",
                    "kl_gap_share"):
            if a[key] is None or b[key] is None:
                assert row[key] is None and row["spread"][key] is None
                continue
            assert row[key] == pytest.approx((a[key] + b[key]) / 2), (row["name"], key)
            assert row["spread"][key] == pytest.approx(abs(a[key] - b[key]) / 2), (row["name"], key)
        (steps_a, losses_a), (steps_b, losses_b) = (zip(*entry["curves"]["heldout"], strict=True) for entry in (a, b))
        steps, losses = zip(*row["curves"]["heldout"], strict=True)
        assert steps == steps_a == steps_b
        assert losses == pytest.approx([(x + y) / 2 for x, y in zip(losses_a, losses_b, strict=True)])
    # The table shows mean ± half the range.
    ce_row = by_name["ce"]
    assert f"| CE only | - | {ce_row['lm_loss']:.4f} ± {ce_row['spread']['lm_loss']:.4f} |" in quality.markdown(report)
    sampled = next(v for v in report["verdicts"] if v["target"].startswith("sampled, N = 50 closes"))
    assert sampled["value"] == by_name["sampled_n50"]["gap_share"]
    assert sampled["per_seed"] == [entry["gap_share"] for entry in by_name["sampled_n50"]["per_seed"]]



def test_real_teacher_rows_are_the_issue_subset(tmp_path):
    setup = quality.QualitySetup(teacher=str(tmp_path), train_data="t.jsonl", heldout_data="h.jsonl",
                                 student_init=(0, 5), output=str(tmp_path), steps=1, batch_size=1, seq_len=8,
                                 rows=("real-teacher",))
    assert setup.rows == ("ce", "topk_tail_k64", "sampled_n50", "sampled_n50_systematic", "hybrid_k64_n50",
                          "hybrid_k64_n50_systematic", "online")


def test_student_init_keeps_the_teachers_layers(setup, llama_dir):
    """--student-init 0: the student is the teacher's first layer with its embeddings, norm and head, so the CE run's
    first loss is the CE of the teacher with its second layer removed by hand, on the seed's first batch."""
    out = setup["root"] / "pruned"
    options = dict(zip(setup["args"][::2], setup["args"][1::2], strict=True))
    del options["--student-config"]
    options |= {"--student-init": "0", "--output": str(out), "--rows": "ce", "--seeds": "3"}
    result = CliRunner().invoke(quality.main, [part for pair in options.items() for part in pair])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "student-init" / "student_init.json").read_text())["layers"]["kept"] == [0]
    report = json.loads((out / "quality.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["ce", "online"]
    assert report["setup"]["student"] == str(out / "student-init") == report["rows"][0]["options"]["student"]

    batch = next(iter(StoreLoader(LoaderConfig(store=str(out / "stores" / "main"), batch_size=BATCH, seed=3))))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    mask = batch["loss_mask"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:, :-1],
                       attention_mask=batch["attention_mask"][:, :-1].long()).logits.double()[mask]
    ce = torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    first = json.loads((out / "runs" / "seed-3" / "ce" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ce"] == pytest.approx(float(ce), rel=1e-4)

    options["--student-init"] = "1"
    result = CliRunner().invoke(quality.main, [part for pair in options.items() for part in pair])
    assert result.exit_code == 2 and "holds a student of the layers [0]" in result.output, result.output


def test_gap_share_is_averaged_over_the_seeds_shares(tmp_path):
    """Hand-made runs of CE, sampled and online in two seeds: each seed's share is against its own gap, the row's is
    their mean, and times are against each seed's CE run. Seed 0: CE 5.0, online 4.0, sampled 4.1 -> 90%; seed 1:
    CE 5.2, online 4.4, sampled 4.6 -> 75%; the row: 82.5% ± 7.5 (pooled losses would give 84.4%)."""
    losses = {0: {"ce": 5.0, "sampled_n50": 4.1, "online": 4.0}, 1: {"ce": 5.2, "sampled_n50": 4.6, "online": 4.4}}
    walls = {0: {"ce": 10.0, "sampled_n50": 11.0, "online": 25.0}, 1: {"ce": 20.0, "sampled_n50": 20.0, "online": 40.0}}
    # KL to the teacher: seed 0 CE 2.0, online 1.5, sampled 1.6 -> 80%; seed 1 CE 2.5, online 1.5, sampled 1.5 -> 100%.
    kls = {0: {"ce": 2.0, "sampled_n50": 1.6, "online": 1.5}, 1: {"ce": 2.5, "sampled_n50": 1.5, "online": 1.5}}
    rows = [row for row in quality.ROWS if row.name in ("ce", "sampled_n50", "online")]
    per_seed, gaps = {}, {}
    for seed in (0, 1):
        dirs = {}
        for row in rows:
            dirs[row.name] = tmp_path / f"seed-{seed}" / row.name
            dirs[row.name].mkdir(parents=True)
            (dirs[row.name] / "metrics.jsonl").write_text(
                json.dumps({"step": 1, "ce": 6.0, "tokens_per_s": 100.0 * (seed + 1)}) + "\n"
                + json.dumps({"eval": {"step": 1, "lm_loss": losses[seed][row.name] + 1}}) + "\n")
        runs = {row.name: {"options": {"seed": seed, "output": str(dirs[row.name])}, "wall_s": walls[seed][row.name],
                           "resumed": False, "load_average_1min": [1.0, 1.0]} for row in rows}
        metrics = {name: {"lm_loss": loss, "perplexity": math.exp(loss), "ece": 0.01 * (seed + 1),
                          "kl_to_teacher": kls[seed][name], "top1_agreement": 0.5, "tokens": 64}
                   for name, loss in losses[seed].items()}
        per_seed[seed], gaps[seed] = quality.seed_rows(rows, runs, metrics, dirs)
    assert gaps == pytest.approx({0: 1.0, 1: 0.8})
    table = {row["name"]: row for row in quality.aggregate(rows, per_seed, {"ce": None, "sampled_n50": 40.0,
                                                                             "online": None})}
    sampled = table["sampled_n50"]
    assert [entry["gap_share"] for entry in sampled["per_seed"]] == pytest.approx([0.9, 0.75])
    assert (sampled["gap_share"], sampled["spread"]["gap_share"]) == pytest.approx((0.825, 0.075))
    assert (sampled["kl_gap_share"], sampled["spread"]["kl_gap_share"]) == pytest.approx((0.9, 0.1))
    assert (sampled["lm_loss"], sampled["spread"]["lm_loss"]) == pytest.approx((4.35, 0.25))
    assert (sampled["wall_vs_ce"], sampled["spread"]["wall_vs_ce"]) == pytest.approx((1.05, 0.05))
    assert (table["online"]["gap_share"], table["ce"]["gap_share"]) == pytest.approx((1.0, 0.0))
    assert sampled["curves"]["heldout"] == [[1, pytest.approx(5.35)]]
    verdicts = {v["target"]: v for v in quality.verdicts(list(table.values()), gaps)}
    assert not verdicts["sampled, N = 50 closes >= 95% of the CE -> online gap"]["met"]
    kl_verdict = verdicts["sampled, N = 50 closes >= 95% of the CE -> online gap in KL(teacher ‖ student)"]
    assert kl_verdict["per_seed"] == pytest.approx([0.8, 1.0]) and not kl_verdict["met"]
    bytes_target = next(v for name, v in verdicts.items() if name.startswith("some row at <= 50 B/token"))
    assert bytes_target["value"] == pytest.approx(0.825) and not bytes_target["met"]
