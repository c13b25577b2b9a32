"""Cross-tokenizer batches (student_train.cross_tokenizer): a store batch in the teacher's ids re-expressed in the
student's, with the records the cross-tokenizer losses read; and `student-train` on a student with another tokenizer.

The chunks themselves are checked against `tokenizer.decode` in tests/test_alignment.py; here they are the oracle,
and every record of the transform is recomputed from them with plain loops. Token bytes are read by hand: GPT-2's
byte table from transformers for byte-level BPE, `▁` and `<0xNN>` for sentencepiece.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SHAKESPEARE, TOKENIZER_DIR, make_small_store, make_student_config, train_killed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from storage.alignment import student_tokens, teacher_text
from storage.causal_lm import forward_inputs
from storage.manifest import isolates_documents
from storage.reader import Store
from student_train.cli import main as train_main
from student_train.config import TrainConfig
from student_train.cross_tokenizer import CrossTokenizer
from student_train.loader import LoaderConfig, StoreLoader
from student_train.train import train


@functools.cache
def llama():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@functools.cache
def byte_level(bos: str | None = "<|im_start|>"):
    """A byte-level BPE tokenizer trained on Shakespeare (GPT-2 scheme)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(SHAKESPEARE.read_text().splitlines()[:2000], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token=bos)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for inside a text, read by hand."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if tokenizer is llama():
        if token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("▁", " ").encode()
    table = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(table[char] for char in token)


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> str:
    return str(make_small_store(tmp_path_factory.mktemp("cross"), llama_dir, corpus_texts[:40]))


def batches(store: str, transform=None, batch_size: int = 4):
    loader = StoreLoader(LoaderConfig(store=store, batch_size=batch_size, shuffle=False, drop_last=False,
                                      verify=False), transform=transform)
    return list(loader)


def test_with_the_same_tokenizer_a_sample_from_a_document_start_is_unchanged(store):
    """The teacher's own tokenizer gives back the stored sample wherever the stored ids are the tokenizer's own
    tokenization of their text: the same ids and mask, one chunk per token whose log-likelihood is the stored
    true-token log-prob, and the stored top-k at every trained position but the one after a special token."""
    cross = CrossTokenizer(llama(), llama(), Store(store).manifest.teacher["vocab_size"])
    checked = 0
    for batch in batches(store):
        out = cross(batch)
        for b in range(len(batch["input_ids"])):
            ids = batch["input_ids"][b][batch["attention_mask"][b]].tolist()
            document = ids[:ids.index(2) + 1] if 2 in ids else ids
            text = llama().decode(document, skip_special_tokens=True)
            canonical = llama()(text)["input_ids"] + ([2] if 2 in ids else [])
            if ids[0] != 1 or canonical != document:
                continue
            checked += 1
            n = len(document)  # compare the first document: the transform's tokens run on past it
            assert out["input_ids"][b][:n].tolist() == document
            trained = batch["loss_mask"][b][:n - 1]
            assert out["loss_mask"][b][:n - 1].tolist() == trained.tolist()
            for j in range(n - 1):
                chunk = int(out["chunk_ids"][b, j])  # one chunk per token, special tokens included
                assert (chunk >= 0) == bool(trained[j])
                if chunk >= 0:
                    assert float(out["chunk_logprob"][b, chunk]) == pytest.approx(float(batch["true_logprob"][b, j]))
                text_after_special = (j == 0 or ids[j] in (1, 2)) and ids[j + 1] not in (1, 2)
                assert bool(out["kd_mask"][b, j]) == (bool(trained[j]) and not text_after_special)
                if out["kd_mask"][b, j]:
                    assert out["topk_ids"][b, j].tolist() == batch["topk_ids"][b, j].tolist()
                    assert torch.equal(out["topk_logprobs"][b, j], batch["topk_logprobs"][b, j])
                    assert float(out["tail_logmass"][b, j]) == float(batch["tail_logmass"][b, j])
    assert checked >= 3


def test_a_student_with_another_tokenizer_gets_every_record_of_its_chunks(store):
    """Llama-2 sentencepiece teacher, byte-level BPE student: the student's sample spells the teacher's documents
    with the specials mapped, and each record agrees with a loop over the chunks."""
    student = byte_level()
    cross = CrossTokenizer(llama(), student, Store(store).manifest.teacher["vocab_size"])
    bos, eos = student.convert_tokens_to_ids("<|im_start|>"), student.eos_token_id
    for batch in batches(store)[:4]:
        out = cross(batch)
        for b in range(len(batch["input_ids"])):
            ids_t = batch["input_ids"][b][batch["attention_mask"][b]].numpy()
            ids_s = out["input_ids"][b][out["attention_mask"][b]].numpy()
            specials_t = [{1: bos, 2: eos}[i] for i in ids_t if i in (1, 2)]
            assert [i for i in ids_s if i in (bos, eos)] == specials_t
            # Each document reads the same through both decoders.
            split_t = np.split(ids_t, np.flatnonzero(np.isin(ids_t, (1, 2))))
            split_s = np.split(ids_s, np.flatnonzero(np.isin(ids_s, (bos, eos))))
            assert [student.decode(part, skip_special_tokens=True) for part in split_s] == [
                llama().decode(part, skip_special_tokens=True) for part in split_t]
            # The oracle: the chunks of the two tokenizations.
            teacher = teacher_text(llama(), ids_t)
            tokens = student_tokens(student, teacher.text, breaks=teacher.breaks)
            text_s = ids_s[~np.isin(ids_s, (bos, eos))]
            assert text_s.tolist() == tokens.ids.tolist()
            trained_t = np.concatenate([[False], batch["loss_mask"][b][:len(ids_t) - 1].numpy()])
            true_t = np.concatenate([[0.0], batch["true_logprob"][b][:len(ids_t) - 1].numpy()])
            positions = {}  # chunk -> the positions pointing at it
            for j, chunk in enumerate(out["chunk_ids"][b][:len(ids_s) - 1].tolist()):
                if chunk >= 0:
                    positions.setdefault(chunk, []).append(j)
            logprob = out["chunk_logprob"][b].numpy()
            assert sorted(positions) == np.flatnonzero(np.isfinite(logprob)).tolist()
            chars = out["chars"][b].numpy()
            special_order_s = np.flatnonzero(np.isin(ids_s, (bos, eos))).tolist()
            special_order_t = np.flatnonzero(np.isin(ids_t, (1, 2))).tolist()
            for chunk, members in positions.items():
                if ids_s[members[0] + 1] in (bos, eos):  # a special token: a chunk of its own
                    assert len(members) == 1
                    teacher_index = special_order_t[special_order_s.index(members[0] + 1)]
                    assert trained_t[teacher_index] and logprob[chunk] == pytest.approx(true_t[teacher_index])
                    continue
                # The chunk's student tokens, as characters, are a stretch of text that starts and ends on teacher
                # token boundaries; the teacher tokens inside it are all trained and sum to its log-likelihood.
                start = sum(int(chars[j]) for j in range(members[0]))  # characters before the first member's token
                start += len(student.decode(ids_s[:1], skip_special_tokens=True))
                end = start + sum(int(chars[j]) for j in members)
                assert members == list(range(members[0], members[-1] + 1))
                assert all(out["loss_mask"][b, j] for j in members)
                inside = [i for i in range(len(ids_t)) if not teacher.special[i] and
                          start <= teacher.spans[i, 0] and teacher.spans[i, 1] <= end and
                          teacher.spans[i, 1] > teacher.spans[i, 0]]
                assert "".join(teacher.text[teacher.spans[i, 0]:teacher.spans[i, 1]] for i in inside) == \
                    teacher.text[start:end]
                assert all(trained_t[i] for i in inside)
                assert logprob[chunk] == pytest.approx(sum(true_t[i] for i in inside), abs=1e-4)


def test_mapped_ids_stand_for_the_same_bytes(store):
    """Every valid mapped entry is a student token of exactly the teacher token's bytes, and a teacher token with a
    student token of its bytes is always mapped."""
    student = byte_level()
    cross = CrossTokenizer(llama(), student, Store(store).manifest.teacher["vocab_size"])
    by_bytes = {}
    for i in range(len(student)):
        if i not in (student.bos_token_id, student.eos_token_id):
            by_bytes.setdefault(token_bytes(student, i), i)
    seen = 0
    for batch in batches(store)[:3]:
        out = cross(batch)
        at = out["kd_mask"].nonzero().tolist()
        assert at
        for b, j in at:
            for slot, student_id in enumerate(out["topk_ids"][b, j].tolist()):
                if student_id < 0:
                    continue
                seen += 1
                logp = float(out["topk_logprobs"][b, j, slot])
                teacher_ids = batch["topk_ids"][b].view(-1).tolist()
                assert math.isfinite(logp) and teacher_ids
                assert token_bytes(student, student_id) in {token_bytes(llama(), t) for t in teacher_ids
                                                            if t > 2}
    assert seen > 50
    # Brute force over the teacher's vocabulary: mapped exactly when a student token has the bytes.
    vocab = cross.vocab_map
    for teacher_id in range(3, len(llama())):
        expected = by_bytes.get(token_bytes(llama(), teacher_id), -1)
        if expected >= 0 or vocab[teacher_id] >= 0:
            assert token_bytes(student, int(vocab[teacher_id])) == token_bytes(llama(), teacher_id)


def test_teacher_ids_of_one_student_token_merge_their_probability():
    """Sentencepiece's byte token <0x61> and its piece "a" are the same byte for a byte-level student: one bucket
    with the summed probability, the other entry emptied."""
    student = byte_level()
    teacher = llama()
    ids = [1, *teacher("a b", add_special_tokens=False)["input_ids"]]
    byte_a, piece_a = teacher.convert_tokens_to_ids("<0x61>"), teacher.convert_tokens_to_ids("a")
    k, n = 3, len(ids) - 1
    topk_ids = torch.tensor([[piece_a, byte_a, teacher.convert_tokens_to_ids("▁b")]] * n)
    topk_logprobs = torch.log(torch.tensor([[0.2, 0.1, 0.3]] * n))
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.bool),
             "loss_mask": torch.ones(1, n, dtype=torch.bool), "segment_ids": torch.zeros(1, len(ids), dtype=torch.long),
             "true_logprob": torch.full((1, n), -1.0), "sample_ids": torch.tensor([0]),
             "topk_ids": topk_ids[None], "topk_logprobs": topk_logprobs[None], "tail_logmass": torch.full((1, n), -1.0)}
    out = CrossTokenizer(teacher, student, 32000)(batch)
    at = out["kd_mask"][0].nonzero().flatten()
    assert len(at) >= 1 and out["topk_ids"].shape[-1] == k
    for j in at:
        mapped, logp = out["topk_ids"][0, j].tolist(), out["topk_logprobs"][0, j]
        assert mapped[0] == student.convert_tokens_to_ids("a") and mapped[1] == -1
        assert float(logp[0].exp()) == pytest.approx(0.3) and logp[1] == -math.inf
        assert token_bytes(student, mapped[2]) == b" b" and float(logp[2].exp()) == pytest.approx(0.3)


def test_a_special_token_the_student_lacks_is_refused_with_the_fix():
    student = byte_level(bos=None)  # no BOS and no "<s>": the teacher's BOS has no counterpart
    ids = [1, *llama()("hello", add_special_tokens=False)["input_ids"]]
    n = len(ids) - 1
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.bool),
             "loss_mask": torch.ones(1, n, dtype=torch.bool), "segment_ids": torch.zeros(1, len(ids), dtype=torch.long),
             "true_logprob": torch.zeros(1, n), "sample_ids": torch.tensor([0])}
    with pytest.raises(ValueError, match=r"'<s>' \(id 1\) has no counterpart .*add_special_tokens"):
        CrossTokenizer(llama(), student, 32000)(batch)


@pytest.fixture(scope="module")
def byte_level_student(tmp_path_factory) -> Path:
    """A config-only student (random init, width 32) with the byte-level tokenizer."""
    path = tmp_path_factory.mktemp("byte-level-student")
    tokenizer = byte_level()
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_args(store: str, student: Path, output: Path, *extra: str) -> list[str]:
    return ["--store", store, "--student", str(student), "--output", str(output), "--max-steps", "3", "--batch-size",
            "4", "--eval-every", "3", "--eval-fraction", "0.2", "--log-every", "1", "--device", "cpu", *extra]


@pytest.mark.parametrize("targets", ["chunks", "mapped", "sorted"])
def test_student_train_trains_a_student_with_another_tokenizer(tmp_path, store, byte_level_student, targets, caplog):
    divergence = "tv" if targets == "sorted" else "forward_kl"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(train_main, train_args(store, byte_level_student, tmp_path / "run",
                                                           "--targets-from", targets, "--loss", f"{divergence}=1",
                                                           "--loss", "ce=0.5"))
    assert result.exit_code == 0, result.output
    assert "training through the character alignment" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "eval" not in r]
    assert len(steps) == 3 and all(math.isfinite(r[divergence]) and r[divergence] > 0 for r in steps)
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    # Bits per character: the held-out CE (nats per student token) over the characters those tokens hold.
    assert 0 < final["bits_per_char"] < final["lm_loss"] / math.log(2)
    saved = AutoTokenizer.from_pretrained(tmp_path / "run")
    assert saved.get_vocab() == byte_level().get_vocab()


def test_student_tokenizer_option_overrides_the_students_own(tmp_path, store, llama_dir):
    """A student directory with the teacher's tokenizer, told to read another: the alignment path runs, and the
    saved student carries the tokenizer it was trained with."""
    student = tmp_path / "student"
    make_student_config(student, llama_dir)
    tokenizer_dir = tmp_path / "tokenizer"
    byte_level().save_pretrained(tokenizer_dir)
    result = CliRunner().invoke(train_main, train_args(store, student, tmp_path / "run", "--student-tokenizer",
                                                       str(tokenizer_dir)))
    assert result.exit_code == 0, result.output
    assert AutoTokenizer.from_pretrained(tmp_path / "run").get_vocab() == byte_level().get_vocab()
    assert "bits_per_char" in json.loads((tmp_path / "run" / "final_metrics.json").read_text())


def test_tokenizers_that_cannot_align_keep_the_mismatch_error(tmp_path, store):
    """A tokenizer whose tokens do not stand for bytes (no decoder): the mismatch, why alignment fails, the fix."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["a tiny tokenizer without a decoder"] * 10,
                                  trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    path = tmp_path / "whitespace"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    result = CliRunner().invoke(train_main, train_args(store, path, tmp_path / "run", "--student-tokenizer",
                                                       str(path)))
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "tokenizer mismatch" in message and "Use a student with the teacher's tokenizer" in message
    assert "character alignment is not possible" in message and "byte-level" in message


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--targets-from", "topk_tail"], "choose one of chunks, mapped, sorted"),
    (["--top-k", "4"], "--top-k: the student"),
])
def test_same_tokenizer_options_are_refused_across_tokenizers(tmp_path, store, byte_level_student, extra, fragment):
    result = CliRunner().invoke(train_main, train_args(store, byte_level_student, tmp_path / "run", *extra))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert fragment in " ".join(result.output.split())
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_cross_tokenizer_run_resumes_exactly(tmp_path, store, byte_level_student, monkeypatch):
    """Stopped after its step-2 checkpoint, the resumed run's steps and weights equal an uninterrupted run's."""
    def config(output: Path, **overrides) -> TrainConfig:
        return TrainConfig(store=store, student=str(byte_level_student), output=str(output), batch_size=4,
                           max_steps=4, lr=1e-2, eval_fraction=0.2, eval_every=2, save_every=2, log_every=1,
                           device="cpu", seed=3, targets_from="chunks", **overrides)

    train(config(tmp_path / "full"))
    train_killed(monkeypatch, config(tmp_path / "cut"), completed=3)
    train(config(tmp_path / "cut", resume=True))
    runs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
             if "eval" not in line] for name in ("full", "cut")]
    assert [r["step"] for r in runs[1]] == [1, 2, 3, 4]
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "forward_kl", "ce", "tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    for name, value in full.items():
        torch.testing.assert_close(cut[name], value, rtol=1e-5, atol=1e-6)


def test_check_says_whether_another_tokenizer_aligns(tmp_path, store, byte_level_student):
    result = CliRunner().invoke(train_main, ["check", "--store", store, "--student", str(byte_level_student)])
    assert result.exit_code == 0, result.output
    assert "through the character alignment" in result.output and "--targets-from mapped" in result.output
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["no decoder"] * 10, trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    path = tmp_path / "whitespace"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(path)
    result = CliRunner().invoke(train_main, ["check", "--store", store, "--student", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "tokenizer mismatch" in result.output and "alignment is not possible" in result.output


def test_cross_evaluation_is_bits_per_character_and_the_kl_at_aligned_positions(tmp_path, store, byte_level_student):
    """The held-out numbers of a cross-tokenizer run, recomputed from the saved student by loops: the LM loss over
    the trained positions, bits per character over the characters of the predicted tokens (read by decoding each
    one), and the forward KL to the mapped top-k + tail at the aligned positions only."""
    result = CliRunner().invoke(train_main, train_args(store, byte_level_student, tmp_path / "run", "--max-steps",
                                                       "1", "--eval-every", "1"))
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    student = byte_level()
    cross = CrossTokenizer(llama(), student, Store(store).manifest.teacher["vocab_size"])
    loader = StoreLoader(LoaderConfig(store=store, batch_size=4, shuffle=False, drop_last=False,
                                      only_fraction_from_end=0.2, verify=False), transform=cross)
    isolated = isolates_documents(Store(store).manifest.build)
    nats = chars = kl = 0.0
    tokens = aligned = 0
    for batch in loader:
        segments = batch["segment_ids"][:, :-1] if isolated else None
        with torch.no_grad():
            logits = model(**forward_inputs(batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1],
                                            segments)).logits.double()
        for b, j in batch["loss_mask"].nonzero().tolist():
            logq = logits[b, j].log_softmax(-1)
            token = int(batch["input_ids"][b, j + 1])
            nats -= float(logq[token])
            chars += len(student.decode([token], skip_special_tokens=True))  # special tokens hold no text
            tokens += 1
            if not batch["kd_mask"][b, j]:
                continue
            aligned += 1
            ids, logp = batch["topk_ids"][b, j], batch["topk_logprobs"][b, j].double()
            p = [math.exp(v) for i, v in zip(ids.tolist(), logp.tolist(), strict=True) if i >= 0]
            total = math.exp(float(torch.logsumexp(logp, 0))) + math.exp(float(batch["tail_logmass"][b, j]))
            p = [v / total for v in p] + [1 - sum(v / total for v in p)]
            q = [math.exp(float(logq[i])) for i in ids.tolist() if i >= 0]
            q += [1 - sum(q)]
            kl += sum(a * math.log(a / c) for a, c in zip(p, q, strict=True) if a > 0)
    assert final["tokens"] == tokens and aligned < tokens
    assert final["lm_loss"] == pytest.approx(nats / tokens, rel=1e-4)
    assert final["bits_per_char"] == pytest.approx(nats / chars / math.log(2), rel=1e-4)
    assert final["kl"] == pytest.approx(kl / aligned, rel=1e-3)
