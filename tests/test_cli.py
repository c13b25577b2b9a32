"""Every `teacher-cache` and `student-train` command through click's `CliRunner`.

The figures the commands print (samples, tokens, positions, shards) are checked against numbers computed here
from the tokenizer and the dataset, not against the store the build just wrote. Error paths of `build` live in
`test_errors.py`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import write_jsonl, write_manifest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from student_train.cli import main as student_main
from teacher_cache.cli import main

SEQ_LEN = 32
NUM_DOCS = 12
SAMPLES_PER_SHARD = 4


@pytest.fixture(scope="module")
def texts(corpus_texts) -> list[str]:
    return corpus_texts[:NUM_DOCS]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("cli-data") / "docs.jsonl", texts)


@pytest.fixture(scope="module")
def expected(llama_dir, texts) -> dict:
    """What the store must hold, from the tokenizer alone: documents + EOS, packed with stride SEQ_LEN."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    stream = np.concatenate(docs)
    samples = math.ceil((len(stream) - 1) / SEQ_LEN)
    return {"stream": stream, "samples": samples, "tokens": len(stream) - 1, "positions": samples * SEQ_LEN,
            "shards": math.ceil(samples / SAMPLES_PER_SHARD)}


@pytest.fixture(scope="module")
def built(tmp_path_factory, llama_dir, dataset):
    """(store, result) of one `teacher-cache build` of the tiny Llama."""
    output = tmp_path_factory.mktemp("cli") / "store"
    result = CliRunner().invoke(main, [
        "build", "--model", str(llama_dir), "--dataset", str(dataset), "--output", str(output),
        "--seq-len", str(SEQ_LEN), "--batch-size", "3", "--samples-per-shard", str(SAMPLES_PER_SHARD),
        "--top-k", "8", "--samples", "16", "--seed", "3", "--device", "cpu", "--dtype", "float32",
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    return output, result


def test_build_reports_what_it_wrote(built, expected):
    store, result = built
    assert expected["samples"] == 11 and expected["shards"] == 3  # 352 tokens -> 351 targets
    assert (f"Wrote {expected['samples']} samples, {expected['tokens']} trained tokens in {expected['shards']} "
            f"shards to {store}:") in result.stdout
    bytes_on_disk = sum(p.stat().st_size for p in (store / "shards").glob("shard-*/*/**/*") if p.is_file())
    assert f"{bytes_on_disk / expected['tokens']:.1f} bytes/token." in result.stdout


def test_info_json_matches_the_dataset(built, expected, llama_dir, dataset):
    store, _ = built
    result = CliRunner().invoke(main, ["info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["complete"] is True and report["format_version"] == 4
    assert report["samples"] == expected["samples"]
    assert report["tokens"] == expected["tokens"]
    assert report["positions"] == expected["positions"]
    assert report["shards"] == expected["shards"]
    assert report["store"] == str(store)
    assert report["teacher"]["model"] == str(llama_dir)
    assert report["teacher"]["vocab_size"] == 32000 and report["teacher"]["architecture"] == "LlamaForCausalLM"
    assert report["dataset"]["source"] == str(dataset) and report["dataset"]["text_field"] == "text"
    assert report["build"] == {"seq_len": SEQ_LEN, "pack": True, "max_samples": None, "batch_size": 3,
                               "samples_per_shard": SAMPLES_PER_SHARD, "seed": 3}
    assert report["targets"]["topk"]["k"] == 8 and report["targets"]["sampled"]["num_draws"] == 16
    assert "hidden_states" not in report["targets"]
    # bytes/token: the store's files on disk (array directories) over the trained tokens.
    on_disk = sum(p.stat().st_size for p in (store / "shards").glob("shard-*/*/**/*") if p.is_file())
    assert report["bytes_per_token"]["total"] == pytest.approx(on_disk / expected["tokens"])


def test_info_text(built, expected):
    store, _ = built
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"store      {store}  (complete)"
    assert lines[1] == (f"samples    {expected['samples']} in {expected['shards']} shards; {expected['tokens']} "
                        f"trained tokens of {expected['positions']} positions "
                        f"({expected['tokens'] / expected['positions']:.1%})")
    assert "vocab 32000" in lines[2] and "LlamaForCausalLM" in lines[2]
    assert f"seq_len {SEQ_LEN}, packed" in lines[3]
    assert lines[4] == "kinds      topk: top-8 + tail mass; sampled: 16 draws (full distribution, systematic)"
    assert lines[5].startswith("targets    ") and "topk" in lines[5] and "sampled" in lines[5]
    assert "bytes/token" in result.stdout and "topk_logprobs" in result.stdout


def test_info_shows_an_incomplete_store(tmp_path, built):
    store = Path(shutil.copytree(built[0], tmp_path / "store"))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["complete"] = False
    write_manifest(store / "manifest.json", manifest)
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 0
    assert "INCOMPLETE: resume the build" in result.stdout
    assert json.loads(CliRunner().invoke(main, ["info", str(store), "--json"]).stdout)["complete"] is False
    # export refuses a store whose build has not finished, and says how to finish it
    out = tmp_path / "x.parquet"
    result = CliRunner().invoke(main, ["export", str(store), str(out)])
    assert result.exit_code == 1 and "--resume" in result.output
    assert not out.exists()


def test_verify(tmp_path, built):
    store = Path(shutil.copytree(built[0], tmp_path / "store"))
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code == 0, result.output
    assert "every file matches its checksum" in result.stdout

    victim = store / "shards" / "shard-000001" / "topk_ids" / "zarr.json"
    victim.write_bytes(victim.read_bytes().replace(b'"axes"', b'"AXES"'))
    (store / "shards" / "shard-000002" / "entropy" / "zarr.json").unlink()
    result = CliRunner().invoke(main, ["verify", str(store)])
    assert result.exit_code == 1
    assert "store is damaged" in result.output
    assert "shards/shard-000001/topk_ids/zarr.json: checksum mismatch" in result.output
    assert "shards/shard-000002/entropy/zarr.json: missing" in result.output


def test_export_writes_the_packed_stream(tmp_path, built, expected):
    store, _ = built
    out = tmp_path / "store.parquet"
    result = CliRunner().invoke(main, ["export", str(store), str(out), "--format", "parquet"])
    assert result.exit_code == 0, result.output
    assert f"Wrote {expected['samples']} samples to {out}." in result.stdout
    table = pq.read_table(out)
    assert table.num_rows == expected["samples"]
    stream = expected["stream"]
    rows = zip(table.column("input_ids").to_pylist(), table.column("attention_mask").to_pylist(), strict=True)
    for i, (ids, mask) in enumerate(rows):
        window = stream[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1]
        assert ids[:len(window)] == window.tolist()
        assert mask == [t < len(window) for t in range(SEQ_LEN + 1)]
    draws = [sum(position) for row in table.column("sampled_counts").to_pylist() for position in row]
    loss = [m for row in table.column("loss_mask").to_pylist() for m in row]
    assert draws == [16 * m for m in loss]


def test_export_rejects_unknown_format(tmp_path, built):
    result = CliRunner().invoke(main, ["export", str(built[0]), str(tmp_path / "x.csv"), "--format", "csv"])
    assert result.exit_code == 2 and "--format" in result.output and "'csv'" in result.output
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("command, options", [
    ([], ["build", "info", "verify", "export"]),
    (["build"], ["--model", "--dataset", "--output", "--text-field", "--seq-len", "--pack / --no-pack", "--targets",
                 "--top-k", "--samples", "--seed", "--hidden-layers", "--batch-size", "--samples-per-shard",
                 "--max-samples", "--device", "--dtype", "--resume"]),
    (["build"], ["[KEY=VALUE]...", "--config FILE", "--print-config", "--model TEXT", "[required]",
                 "[default: topk,sampled]", "--samples INTEGER", "[default: 50]", "[transformers|vllm]"]),
    (["info"], ["STORE", "--json"]),
    (["info"], ["info [OPTIONS] STORE [KEY=VALUE]...", "--config FILE", "--print-config"]),
    (["select"], ["--band LOW:HIGH", "--output FILE", "--by [entropy|nll|tail_mass|top1]", "[default: shuffle]"]),
    (["merge"], ["merge [OPTIONS] STORES... [KEY=VALUE]...", "--ensemble", "--weights TEXT"]),
    (["verify"], ["STORE", "checksum"]),
    (["export"], ["STORE", "OUTPUT", "--format", "parquet"]),
])
def test_teacher_cache_help(command, options):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    for option in options:
        assert option in " ".join(result.output.split()), option  # as wrapped to any width


@pytest.mark.parametrize("command, options", [
    ([], ["check"]),
    (["check"], ["--store", "--student"]),
    ([], ["--min-lr-fraction FLOAT", "[default: 0.1]", "--keep-checkpoints INTEGER", "[default: 2]",
          "--verify / --no-verify", "--loss NAME=WEIGHT", "--print-config"]),
    (["check"], ["check [OPTIONS] [KEY=VALUE]...", "--config FILE", "--print-config"]),
    (["eval"], ["--all", "--dtype [auto|float32|bfloat16|float16]", "--config FILE", "--print-config"]),
])
def test_student_train_help(command, options):
    result = CliRunner().invoke(student_main, [*command, "--help"])
    assert result.exit_code == 0
    for option in options:
        assert option in " ".join(result.output.split()), option  # as wrapped to any width


# --- student-train check ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_tokenizer_student(tmp_path_factory, texts) -> Path:
    """A tiny GPT-2 whose byte-level BPE tokenizer is trained here on a few paragraphs (not Llama-2's)."""
    path = tmp_path_factory.mktemp("other-student")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_check_accepts_the_teacher_itself(built, llama_dir):
    store, _ = built
    result = CliRunner().invoke(student_main, ["check", "--store", str(store), "--student", str(llama_dir)])
    assert result.exit_code == 0, result.output
    assert f"{llama_dir} can train on {store}: same tokenizer, vocabulary 32000." in result.stdout


def test_check_accepts_another_architecture_with_the_same_tokenizer(built, gpt2_dir):
    result = CliRunner().invoke(student_main, ["check", "--store", str(built[0]), "--student", str(gpt2_dir)])
    assert result.exit_code == 0, result.output


def test_check_names_another_tokenizer_and_how_it_trains(built, llama_dir, other_tokenizer_student):
    """Another byte-level tokenizer is not the store's, and aligns with it by characters."""
    student = other_tokenizer_student
    size = len(AutoTokenizer.from_pretrained(student))
    assert 256 < size <= 400
    result = CliRunner().invoke(student_main, ["check", "--store", str(built[0]), "--student", str(student)])
    assert result.exit_code == 0, result.output
    assert f"its tokenizer ({size} tokens) is not the store's (32000)" in result.output
    assert "through the character alignment" in result.output


def test_check_missing_store(tmp_path, llama_dir):
    result = CliRunner().invoke(student_main, ["check", "--store", str(tmp_path / "none"), "--student",
                                               str(llama_dir)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert f"{tmp_path / 'none'} has no manifest.json" in result.output


def test_check_missing_student(tmp_path, built):
    missing = tmp_path / "no-student"
    result = CliRunner().invoke(student_main, ["check", "--store", str(built[0]), "--student", str(missing)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert str(missing) in result.output
