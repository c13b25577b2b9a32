"""Student init from the teacher's layers: all layers reproduce the teacher, chosen layers equal a forward through
the teacher's own blocks, the saved student generates with its KV cache, and `student-train --init-from-teacher`
trains, resumes without the teacher's weights and refuses bad layer lists and unsupported models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, make_small_store, train_killed
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from student_train.cli import main
from student_train.config import TrainConfig
from student_train.init_student import every_other_layer, resolve_layers, select_layers
from student_train.train import train


def _llama(layers: int = 4, vocab_size: int = 128, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=False, **overrides)).eval()


def _gpt2(layers: int = 4, vocab_size: int = 128, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, **overrides)).eval()


def _save(model, path: Path, tokenizer_dir: Path = TOKENIZER_DIR) -> Path:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def _ids(vocab_size: int = 128, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("teacher_dir", ["llama_dir", "gpt2_dir"])
@torch.no_grad()
def test_keeping_every_layer_reproduces_the_teacher(request, teacher_dir):
    teacher = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(teacher_dir)).eval()
    student = select_layers(teacher, [0, -1])
    ids = _ids(32000)
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    assert torch.equal(student(ids).logits, teacher(ids).logits)
    student.get_output_embeddings().weight.zero_()  # a copy: training the student leaves the teacher alone
    assert teacher.get_output_embeddings().weight.abs().sum() > 0


@torch.no_grad()
def test_kept_layers_equal_a_forward_through_the_teachers_blocks():
    teacher = _llama(attn_implementation="eager")
    student = select_layers(teacher, [0, 2])
    assert (student.config.num_hidden_layers, teacher.config.num_hidden_layers) == (2, 4)
    theirs = teacher.state_dict()
    ours = student.state_dict()
    assert len(ours) == len(theirs) - 2 * len(teacher.model.layers[0].state_dict())
    for name, value in ours.items():
        parts = name.split(".")  # model.layers.1.mlp.up_proj.weight is the teacher's model.layers.2.mlp...
        if name.startswith("model.layers."):
            parts[2] = str([0, 2][int(parts[2])])
        assert torch.equal(value, theirs[".".join(parts)]), name

    ids = _ids()
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    hidden = teacher.model.embed_tokens(ids)
    rotary = teacher.model.rotary_emb(hidden, position_ids=positions)
    for index in (0, 2):
        hidden = teacher.model.layers[index](hidden, attention_mask=causal, position_ids=positions,
                                             position_embeddings=rotary)
    expected = teacher.lm_head(teacher.model.norm(hidden))
    torch.testing.assert_close(student(ids).logits, expected)


@pytest.mark.parametrize("make", [_llama, _gpt2])
@torch.no_grad()
def test_saved_student_generates_with_its_kv_cache(tmp_path, make):
    select_layers(make(), [1, 3]).save_pretrained(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx")] == [0, 1]  # the cache's slots
    ids = _ids(length=6)
    runs = [student.generate(ids, max_new_tokens=8, do_sample=False, use_cache=cache, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0) for cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].logits, runs[1].logits, strict=True):
        torch.testing.assert_close(cached, uncached)


@torch.no_grad()
def test_per_layer_settings_follow_their_layers(tmp_path):
    """Layers 2 and 3 of this teacher use a sliding window; the kept layers keep theirs, saved and reloaded."""
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=4, max_window_layers=2)).eval()
    student = select_layers(teacher, [1, 2])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in student.model.layers] == [None, 4]
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    ids = _ids(length=12)  # longer than the window
    assert torch.equal(reloaded(ids).logits, student(ids).logits)


def test_layer_lists():
    assert every_other_layer(5) == [0, 2, 4] and every_other_layer(1) == [0]
    assert resolve_layers([-1, 0, 2], 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="layer 4 out of range: the model has 4 layers"):
        resolve_layers([0, 4], 4)
    with pytest.raises(ValueError, match="layer 1 named twice"):
        resolve_layers([1, -3], 4)
    with pytest.raises(ValueError, match="no layer"):
        resolve_layers([], 4)
    assert select_layers(_llama(layers=5)).config.num_hidden_layers == 3  # 0, 2, 4 by default


def test_unsupported_architectures_are_refused():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration is not supported.*encoder.block.*decoder.block"):
        select_layers(t5, [0])
    # GPT-2 scaling attention by 1 / (layer index + 1): moved layers would compute something else
    scaled = _gpt2(scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="not supported.*attn.scaling.*depend on their position"):
        select_layers(scaled, [1])
    assert select_layers(scaled, [0, 1, 2, 3]).config.n_layer == 4


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    root = tmp_path_factory.mktemp("init-store")
    return make_small_store(root, llama_dir, corpus_texts[:24], num_draws=8)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 4-layer teacher with the store's tokenizer (not the store's teacher: any with its tokenizer will do)."""
    return _save(_llama(vocab_size=32000), tmp_path_factory.mktemp("teacher4"))


def _options(store: Path, output: Path) -> list[str]:
    return ["--store", str(store), "--output", str(output), "--max-steps", "2", "--batch-size", "4",
            "--eval-every", "2", "--eval-fraction", "0.2", "--device", "cpu"]


def test_cli_trains_a_student_from_teacher_layers(tmp_path, store, teacher, caplog):
    caplog.set_level(logging.INFO, logger="student_train.student")
    result = CliRunner().invoke(main, [*_options(store, tmp_path / "run"), "--init-from-teacher", str(teacher),
                                       "--keep-layers", "0"])
    assert result.exit_code == 0, result.output
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert student.config.num_hidden_layers == 1
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (saved["init_from_teacher"], saved["keep_layers"], saved["student"]) == (str(teacher), [0], None)
    assert f"layers 0 of {teacher}, 1 of its 4" in caplog.text and "x smaller" in caplog.text


def _other_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["another tiny tokenizer"] * 10,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["twice", "out_of_range", "not_a_list", "both_inits", "no_teacher", "neither",
                                  "unsupported", "other_tokenizer"])
def test_cli_refuses(tmp_path, store, teacher, case):
    init = ["--init-from-teacher", str(teacher)]
    args, message = {
        "twice": ([*init, "--keep-layers", "0,-4"], "layer 0 named twice"),
        "out_of_range": ([*init, "--keep-layers", "0,4"], "layer 4 out of range: the model has 4 layers"),
        "not_a_list": ([*init, "--keep-layers", "0-2"], "expected layer indices separated by commas"),
        "both_inits": ([*init, "--student", str(teacher)], "both give the student's init"),
        "no_teacher": (["--student", str(teacher), "--keep-layers", "1"], "--init-from-teacher, which is not given"),
        "neither": ([], "missing --student (or --init-from-teacher)"),
        "unsupported": (["--init-from-teacher", str(_save(_gpt2(vocab_size=32000, scale_attn_by_inverse_layer_idx=True),
                                                          tmp_path / "gpt2"))], "is not supported"),
        "other_tokenizer": (["--init-from-teacher", str(_save(_llama(vocab_size=32000), tmp_path / "other",
                                                             _other_tokenizer(tmp_path / "tokenizer")))],
                            "tokenizer mismatch"),
    }[case]
    result = CliRunner().invoke(main, [*_options(store, tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "run").exists()


def test_resume_needs_no_teacher_weights(tmp_path, store, teacher, monkeypatch):
    """Cut after the step-1 checkpoint and delete the teacher: the resumed run ends where an uninterrupted one does."""
    copy = Path(shutil.copytree(teacher, tmp_path / "teacher"))

    def config(output: str, **overrides) -> TrainConfig:
        return TrainConfig(store=str(store), init_from_teacher=str(copy), output=str(tmp_path / output), batch_size=4,
                           max_steps=2, lr=1e-2, eval_fraction=0.2, eval_every=2, save_every=1, device="cpu",
                           **overrides)

    train(config("full"))
    train_killed(monkeypatch, config("cut"), completed=1)
    shutil.rmtree(copy)  # the tokenizer now comes from the store's teacher
    train(config("cut", resume=True))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "cut")
    assert resumed.config.num_hidden_layers == 2  # layers 0 and 2 by default
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6)
