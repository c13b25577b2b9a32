"""Bad input to `teacher-cache` is a clear error, and nothing already on disk is lost or changed.

Each case goes through click's `CliRunner` (a `UsageError`, exit code 2, whose message names the problem and
the fix) or through `build_cache` (a `ValueError`). Stores and directories that exist before a failing command
are snapshotted byte for byte and compared afterwards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from storage.writer import StoreWriter
from teacher_cache import BuildConfig, build_cache
from teacher_cache.cli import main

# 10 documents, 311 Llama-2 tokens: ceil(310 / 32) = 10 packed samples, in 5 shards of 2.
OPTIONS = ["--seq-len", "32", "--batch-size", "2", "--samples-per-shard", "2", "--top-k", "8", "--samples", "10",
           "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("errors-data") / "docs.jsonl", corpus_texts[:10])


def build(model, dataset, output, *extra: str):
    """`teacher-cache build` through CliRunner with the module's options, then `extra`."""
    args = ["build", "--model", str(model), "--dataset", str(dataset), "--output", str(output), *OPTIONS, *extra]
    return CliRunner().invoke(main, args)


def assert_usage_error(result, *fragments: str) -> None:
    """Exit code 2 (click.UsageError), no traceback, and every fragment in the message."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` with its bytes (the test stores are a few hundred KiB)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete_store(tmp_path_factory, llama_dir, dataset) -> Path:
    output = tmp_path_factory.mktemp("complete") / "store"
    result = build(llama_dir, dataset, output)
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="module")
def incomplete_store(tmp_path_factory, llama_dir, dataset) -> Path:
    """A build whose writer failed after committing its first shard (of 5)."""
    output = tmp_path_factory.mktemp("incomplete") / "store"
    original = StoreWriter.write_shard

    def fail_after_first(self, index, record):
        original(self, index, record)
        raise OSError("injected failure")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StoreWriter, "write_shard", fail_after_first)
        result = build(llama_dir, dataset, output)
    assert isinstance(result.exception, RuntimeError)
    manifest = json.loads((output / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    return output


def _copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "store"))


# --- dataset ------------------------------------------------------------------------------------------------------


def test_missing_text_field_lists_columns_and_the_option(tmp_path, llama_dir):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(["a b c", "d e"])))
    output = tmp_path / "out"
    result = build(llama_dir, source, output)
    assert_usage_error(result, "'text'", "content", "id", "--text-field")
    assert not output.exists()
    # The same through the library, and the named column then works.
    with pytest.raises(ValueError, match=r"no column 'body' \(columns: content, id\).*--text-field"):
        build_cache(BuildConfig(model=str(llama_dir), dataset=str(source), output=str(output), text_field="body",
                                seq_len=32, device="cpu"))
    assert build(llama_dir, source, output, "--text-field", "content").exit_code == 0


def _empty_jsonl(path: Path) -> Path:
    path = path / "empty.jsonl"
    path.write_text("")
    return path


def _empty_txt(path: Path) -> Path:
    path = path / "empty.txt"
    path.write_text("")
    return path


def _header_only_csv(path: Path) -> Path:
    path = path / "empty.csv"
    path.write_text("text,id\n")
    return path


def _zero_row_parquet(path: Path) -> Path:
    path = path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    return path


def _zero_row_saved_dataset(path: Path) -> Path:
    path = path / "saved"
    features = datasets.Features({"text": datasets.Value("string")})
    datasets.Dataset.from_dict({"text": []}, features=features).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("make", [_empty_jsonl, _empty_txt, _header_only_csv, _zero_row_parquet,
                                  _zero_row_saved_dataset], ids=lambda f: f.__name__.strip("_"))
def test_empty_dataset_is_a_clear_error(tmp_path, llama_dir, make):
    source = make(tmp_path)
    output = tmp_path / "out"
    result = build(llama_dir, source, output)
    assert_usage_error(result, str(source), "empty")
    assert not output.exists()


def test_missing_dataset_file_is_a_usage_error(tmp_path, llama_dir):
    missing = tmp_path / "nowhere.jsonl"
    result = build(llama_dir, missing, tmp_path / "out")
    assert_usage_error(result, str(missing))


def test_missing_model_directory_is_a_usage_error(tmp_path, dataset):
    missing = tmp_path / "no-such-model"
    result = build(missing, dataset, tmp_path / "out")
    assert_usage_error(result, str(missing))
    assert not (tmp_path / "out").exists()


def test_unknown_split_of_a_saved_dataset_dict_names_the_splits(tmp_path, llama_dir):
    saved = tmp_path / "dd"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["a b", "c"]})}).save_to_disk(str(saved))
    result = build(llama_dir, saved, tmp_path / "out")
    assert_usage_error(result, "['validation']", "'train'", "--split")
    assert not (tmp_path / "out").exists()


# --- options ------------------------------------------------------------------------------------------------------


def test_top_k_larger_than_the_vocabulary(tmp_path, llama_dir, dataset):
    output = tmp_path / "out"
    result = build(llama_dir, dataset, output, "--top-k", "32001")
    assert_usage_error(result, "--top-k 32001", "32000")
    assert not output.exists()


@pytest.mark.parametrize("targets, named", [("topk,logits", "logits"), ("dense", "dense"), (",", "()")])
def test_unknown_target_kind(tmp_path, llama_dir, dataset, targets, named):
    output = tmp_path / "out"
    result = build(llama_dir, dataset, output, "--targets", targets)
    assert_usage_error(result, "--targets", named, "topk, sampled")
    assert not output.exists()
    with pytest.raises(ValueError, match="unknown target kind"):
        BuildConfig(model="m", dataset="d", output="o", targets=tuple(targets.split(",")))


@pytest.mark.parametrize("option, value, message", [
    ("--seq-len", "1", "--seq-len: must be at least 2, got 1"),
    ("--batch-size", "0", "--batch-size: must be at least 1, got 0"),
    ("--top-k", "0", "--top-k: must be at least 1, got 0"),
    ("--samples", "0", "--samples: must be at least 1, got 0"),
    ("--samples", "70000", "--samples: 70000 draws per position is too many"),
    ("--samples-per-shard", "0", "--samples-per-shard: must be at least 1, got 0"),
    ("--max-samples", "-3", "--max-samples: must be at least 1, got -3"),
])
def test_out_of_range_numbers_name_the_option(tmp_path, llama_dir, dataset, option, value, message):
    result = build(llama_dir, dataset, tmp_path / "out", option, value)
    assert_usage_error(result, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers, named", [("0,3", "[3]"), ("-4", "[-4]"), ("1,7,-9", "[7, -9]")])
def test_hidden_layers_out_of_range(tmp_path, llama_dir, dataset, layers, named):
    output = tmp_path / "out"
    result = build(llama_dir, dataset, output, "--hidden-layers", layers)
    # 2 blocks: hidden states 0 (embeddings), 1, 2; -3..2 are valid.
    assert_usage_error(result, "--hidden-layers", named, "3 hidden states")
    assert not output.exists()


def test_hidden_layers_not_integers(tmp_path, llama_dir, dataset):
    result = build(llama_dir, dataset, tmp_path / "out", "--hidden-layers", "last")
    assert_usage_error(result, "'last'", "8,16,-1")


# --- the output ---------------------------------------------------------------------------------------------------


def test_nonempty_output_without_resume_is_left_untouched(tmp_path, llama_dir, dataset):
    output = tmp_path / "out"
    (output / "sub").mkdir(parents=True)
    (output / "notes.txt").write_text("my notes")
    (output / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = snapshot(output)
    result = build(llama_dir, dataset, output)
    assert_usage_error(result, str(output), "not empty", "--resume", "--output")
    assert snapshot(output) == before
    with pytest.raises(ValueError, match="--resume"):
        build_cache(BuildConfig(model=str(llama_dir), dataset=str(dataset), output=str(output), seq_len=32,
                                device="cpu"))
    assert snapshot(output) == before


def test_existing_store_without_resume_is_left_untouched(tmp_path, llama_dir, dataset, complete_store):
    store = _copy(complete_store, tmp_path)
    before = snapshot(store)
    result = build(llama_dir, dataset, store)
    assert_usage_error(result, "--resume")
    assert snapshot(store) == before


def test_output_is_a_file(tmp_path, llama_dir, dataset):
    output = tmp_path / "out.txt"
    output.write_text("keep me")
    result = build(llama_dir, dataset, output)
    assert_usage_error(result, str(output))
    assert output.read_text() == "keep me"


@pytest.mark.parametrize("extra, fragments", [
    (["--top-k", "16"], ["topk.k", "8", "16"]),
    (["--seq-len", "64"], ["seq_len", "32", "64"]),
    (["--samples", "12"], ["num_draws", "10", "12"]),
    (["--batch-size", "1"], ["batch_size", "2", "1"]),
    (["--no-pack"], ["pack", "True", "False"]),
    (["--targets", "topk"], ["sampled"]),
    (["--hidden-layers", "-1"], ["hidden_states"]),
    (["--max-samples", "4"], ["max_samples", "None", "4"]),
], ids=["top-k", "seq-len", "samples", "batch-size", "pack", "targets", "hidden-layers", "max-samples"])
def test_resume_with_other_options_names_them_and_changes_nothing(tmp_path, llama_dir, dataset, incomplete_store,
                                                                  extra, fragments):
    store = _copy(incomplete_store, tmp_path)
    before = snapshot(store)
    result = build(llama_dir, dataset, store, "--resume", *extra)
    assert_usage_error(result, "Cannot resume", "other options", *fragments)
    assert snapshot(store) == before


def test_resume_with_other_options_names_both_values(tmp_path, llama_dir, dataset, incomplete_store):
    store = _copy(incomplete_store, tmp_path)
    result = build(llama_dir, dataset, store, "--resume", "--seq-len", "64", "--top-k", "16")
    assert_usage_error(result, "build.seq_len: store has 32, this build has 64",
                       "targets.topk.k: store has 8, this build has 16")


def test_resume_with_another_teacher_is_refused(tmp_path, gpt2_dir, dataset, incomplete_store):
    store = _copy(incomplete_store, tmp_path)
    before = snapshot(store)
    result = build(gpt2_dir, dataset, store, "--resume")
    assert_usage_error(result, "Cannot resume", "teacher.architecture", "LlamaForCausalLM", "GPT2LMHeadModel")
    assert snapshot(store) == before


def test_resume_with_the_same_options_still_works(tmp_path, llama_dir, dataset, incomplete_store, complete_store):
    """The control of the cases above: the same copied store and options do resume, to the complete store."""
    store = _copy(incomplete_store, tmp_path)
    result = build(llama_dir, dataset, store, "--resume")
    assert result.exit_code == 0, result.output
    assert snapshot(store / "shards") == snapshot(complete_store / "shards")


def test_resuming_a_complete_store(tmp_path, llama_dir, dataset, complete_store):
    store = _copy(complete_store, tmp_path)
    before = snapshot(store)
    result = build(llama_dir, dataset, store, "--resume")
    assert_usage_error(result, "already complete", "(10 samples)", "nothing to resume")
    assert snapshot(store) == before


# --- reading commands on things that are not stores ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["info", "verify"])
def test_reading_commands_on_a_directory_without_manifest(tmp_path, command):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "a.txt").write_text("hello")
    result = CliRunner().invoke(main, [command, str(tmp_path / "stuff")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "no manifest.json" in result.output and "teacher-cache build" in result.output


def test_export_of_a_nonexistent_path(tmp_path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nothing"), str(tmp_path / "out.parquet")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "no manifest.json" in result.output
    assert not (tmp_path / "out.parquet").exists()


def _manifest_of(complete_store: Path, **changes) -> str:
    data = json.loads((complete_store / "manifest.json").read_text())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("change, fragments", [
    ({"format": "something-else"}, ["not a teacher-cache manifest", "'something-else'"]),
    ({"format_version": 5}, ["format version 5", "up to 4", "Upgrade"]),
])
def test_info_on_a_foreign_or_newer_manifest(tmp_path, complete_store, change, fragments):
    store = _copy(complete_store, tmp_path)
    (store / "manifest.json").write_text(_manifest_of(complete_store, **change))
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    for fragment in fragments:
        assert fragment in result.output


@pytest.mark.parametrize("content", [b'{"format": "teacher-cache", "format_ver',
                                     b'{"format": "teacher-cache", "format_version": 1}', b"\xff\xfe\x00garbage"],
                         ids=["truncated", "no-keys", "binary"])
def test_info_on_a_damaged_manifest_names_it(tmp_path, content):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_bytes(content)
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert "manifest.json" in result.output
