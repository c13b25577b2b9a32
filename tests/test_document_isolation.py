"""Document-isolated packing: with `--document-attention isolated`, the targets of a document inside a packed row
equal those of the document run alone, for the teacher (the store) and the student (training and evaluation)."""

import numpy as np
import pytest
import torch
from conftest import make_small_store, make_student_config
from transformers import AutoModelForCausalLM

from storage.causal_lm import document_positions, forward_inputs
from storage.reader import Store
from student_train.config import TrainConfig
from student_train.train import Trainer
from teacher_cache import BuildConfig

TEXTS = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die, to sleep;", "No more; and by a sleep to say we end"] * 2


def test_document_positions_restart_at_each_document():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_packed_document_reads_as_if_alone(family, llama_dir, gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir if family == "llama" else gpt2_dir).eval()
    rng = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, 1000, (n,), generator=rng) for n in (7, 9, 4))
    ids = torch.cat([a, b, c])[None]
    segments = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4])
    with torch.no_grad():
        alone = model.base_model(input_ids=b[None]).last_hidden_state[0]
        isolated = model.base_model(**forward_inputs(ids, torch.ones_like(ids), segments)).last_hidden_state[0, 7:16]
        across = model.base_model(**forward_inputs(ids, torch.ones_like(ids))).last_hidden_state[0, 7:16]
    assert torch.allclose(isolated, alone, atol=1e-5)
    assert not torch.allclose(across, alone, atol=1e-2)  # what isolation changes


def test_isolated_store_holds_each_documents_own_targets(tmp_path, llama_dir):
    store = Store(make_small_store(tmp_path, llama_dir, TEXTS, document_attention="isolated", targets=("topk",)))
    assert store.manifest.build["document_attention"] == "isolated"
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    sample = store[0]
    segments = sample["segment_ids"]
    checked = 0
    for doc in np.unique(segments)[1:-1]:  # documents wholly inside the sample (the first may start earlier)
        span = np.flatnonzero(segments == doc)
        tokens = torch.from_numpy(sample["input_ids"][span].astype(np.int64))
        with torch.no_grad():
            logp = model(input_ids=tokens[None]).logits[0].float().log_softmax(-1)
        inside = span[:-1]  # positions whose target is the next token of the same document
        true = logp[torch.arange(len(inside)), tokens[1:]].numpy()
        assert np.abs(sample["true_logprob"][inside] - true).max() < 1e-4
        entropy = -(logp.exp() * logp).sum(-1)[:-1].numpy()
        assert np.abs(sample["entropy"][inside] - entropy).max() < 1e-3
        top = logp[:-1].topk(8).values.numpy()
        stored = np.sort(sample["topk_logprobs"][inside], axis=-1)[:, ::-1]
        assert np.abs(stored - top).max() <= 1 / 128 + 1e-4  # the store's 1/64-nat steps
        checked += len(inside)
    assert checked > 10


def test_cross_document_attention_stays_the_default_for_text(tmp_path, llama_dir):
    store = Store(make_small_store(tmp_path, llama_dir, TEXTS, targets=("topk",)))
    assert "document_attention" not in store.manifest.build  # headers as before: a resumed build still matches


def test_isolation_defaults_by_format_and_vllm_refuses_it():
    config = BuildConfig(model="m", dataset="d", output="o")
    assert not config.isolates("text") and config.isolates("messages") and config.isolates("prompt-completion")
    assert not BuildConfig(model="m", dataset="d", output="o", pack=False).isolates("messages")
    assert BuildConfig(model="m", dataset="d", output="o", document_attention="isolated").isolates("text")
    with pytest.raises(ValueError, match=r"--document-attention isolated \(auto, for conversations\): the vllm"):
        BuildConfig(model="m", dataset="d", output="o", backend="vllm", document_attention="isolated")
    vllm = BuildConfig(model="m", dataset="d", output="o", backend="vllm")
    assert not vllm.isolates("text")
    with pytest.raises(ValueError, match=r"\(auto, for conversations\): the vllm backend"):
        vllm.isolates("messages")


def test_student_reads_an_isolated_store_as_the_teacher_did(tmp_path, llama_dir):
    store = make_small_store(tmp_path, llama_dir, TEXTS, document_attention="isolated", targets=("topk",))
    student = make_student_config(tmp_path / "student", llama_dir)
    config = TrainConfig(store=str(store), student=str(student), output=str(tmp_path / "run"), batch_size=1,
                         eval_fraction=0.2, max_steps=1, device="cpu")
    trainer = Trainer(config)
    assert trainer.isolated
    sample = Store(store)[0]
    batch = {name: torch.from_numpy(sample[name][None].astype(np.int64 if name != "attention_mask" else bool))
             for name in ("input_ids", "attention_mask", "segment_ids")}
    with torch.no_grad():
        hidden = trainer._hidden(batch)[0]
        segments = sample["segment_ids"][:-1]
        for doc in np.unique(segments)[1:]:
            span = np.flatnonzero(segments == doc)
            alone = trainer.model.base_model(input_ids=batch["input_ids"][:, span]).last_hidden_state[0]
            assert torch.allclose(hidden[span], alone, atol=1e-5)


def test_stores_of_isolated_and_crossing_documents_do_not_concatenate(tmp_path, llama_dir):
    from storage.concat import concat_stores

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    isolated = make_small_store(tmp_path / "a", llama_dir, TEXTS, document_attention="isolated", targets=("topk",))
    across = make_small_store(tmp_path / "b", llama_dir, TEXTS, targets=("topk",))
    with pytest.raises(ValueError, match="build.document_attention: .* has 'isolated', .* has None"):
        concat_stores([isolated, across], tmp_path / "c")
