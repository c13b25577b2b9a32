"""`student-init`: nothing pruned reproduces the teacher bit for bit; pruned Llama-family and GPT-2 students save, load
with every weight and run with the sizes an independent count gives; dead heads, channels and blocks score 0 and go
first; the scores equal a finite difference, a direct computation and a forward without the block; the command
refuses bad options, naming them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TOKENIZER_DIR, make_small_store
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from student_train.init_student import select_layers
from student_train.prune import choose_heads, find_family, head_counts, prune, shape_of, top_channels
from student_train.prune_cli import REPORT_NAME, StudentInitConfig, _head_count, evenly_spaced, main, prune_teacher
from student_train.prune_importance import (
    block_importance,
    calibration_batches,
    head_and_channel_importance,
    mean_loss,
)

V, H, FFN = 32000, 64, 128  # the store's vocabulary; width and FFN width of the Llama-family models

LLAMA_FAMILY = {
    "llama": (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": False}),
    "mistral": (MistralForCausalLM, MistralConfig, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": True}),  # q/k/v biases, a tied head
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16, "tie_word_embeddings": False}),  # q/k norms per head
}


def _llama_family(name: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab_size: int = V,
                  **overrides):
    cls, config, extra = LLAMA_FAMILY[name]
    torch.manual_seed(0)
    return cls(config(vocab_size=vocab_size, hidden_size=H, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      **extra, **overrides)).eval()


def _gpt2(layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=layers, n_head=4, n_positions=128,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).eval()


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path


def llama_parameters(name: str, *, layers: int, heads: int, kv_heads: int, ffn: int, head_dim: int = 16) -> int:
    """Parameters of a Llama-family model, counted from its shapes: embeddings, head, norms, attention, MLP."""
    attention = H * heads * head_dim * 2 + H * kv_heads * head_dim * 2  # q, o; k, v
    attention += (heads + 2 * kv_heads) * head_dim if name == "qwen2" else 0  # q, k, v biases
    attention += 2 * head_dim if name == "qwen3" else 0  # q_norm, k_norm
    embeddings = V * H if name == "qwen2" else 2 * V * H  # tied head (see LLAMA_FAMILY)
    return embeddings + H + layers * (2 * H + attention + 3 * H * ffn)


def gpt2_parameters(*, layers: int, ffn: int, positions: int = 128) -> int:
    block = 4 * H + (H * 3 * H + 3 * H) + (H * H + H) + (H * ffn + ffn) + (ffn * H + H)  # ln_1, ln_2, attn, mlp
    return 2 * V * H + positions * H + 2 * H + layers * block


def _loads_cleanly(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


def _ids(length: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_dir, corpus_texts) -> Path:
    return make_small_store(tmp_path_factory.mktemp("prune-store"), llama_dir, corpus_texts[:24], num_draws=8)


@pytest.fixture(scope="module")
def batches(store):
    return calibration_batches(str(store), 8, 4, AutoTokenizer.from_pretrained(TOKENIZER_DIR), V, "teacher")


# --- nothing pruned, and pruned students that load and run --------------------------------------------------------


@pytest.mark.parametrize("teacher_dir, everything", [
    ("llama_dir", {}),
    ("llama_dir", {"layers": 2, "layer_importance": True, "heads": 4, "ffn": 1.0}),
    ("gpt2_dir", {"layers": 2, "layer_importance": True, "ffn": 256}),
])
@torch.no_grad()
def test_nothing_pruned_reproduces_the_teachers_logits(request, tmp_path, store, teacher_dir, everything):
    teacher_dir = request.getfixturevalue(teacher_dir)
    report = prune_teacher(StudentInitConfig(teacher=str(teacher_dir), output=str(tmp_path / "student"),
                                             store=str(store), calibration_samples=8, **everything))
    student, teacher = _loads_cleanly(tmp_path / "student"), AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    assert torch.equal(student(_ids()).logits, teacher(_ids()).logits)
    assert report["parameters"]["compression_ratio"] == 1.0 and report["layers"]["kept"] == [0, 1]


@pytest.mark.parametrize("name", list(LLAMA_FAMILY))
@torch.no_grad()
def test_pruned_llama_family_students_load_and_run(tmp_path, name):
    teacher = _llama_family(name)
    family, shape = find_family(teacher), shape_of(teacher, find_family(teacher))
    scores = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)).tolist()
    query, kv = zip(*(choose_heads(layer, shape, 2) for layer in scores), strict=True)
    channels = [top_channels(layer, 40) for layer in torch.rand(2, FFN).tolist()]
    pruned = prune(teacher, family, query_heads=list(query), kv_heads=list(kv), channels=channels)
    student = _loads_cleanly(_save(pruned, tmp_path))
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (2, 2)
    expected = llama_parameters(name, layers=2, heads=2, kv_heads=2, ffn=40)
    assert student.num_parameters() == pruned.num_parameters() == expected  # a tied head stays tied in memory too
    assert teacher.num_parameters() == llama_parameters(name, layers=2, heads=4, kv_heads=2, ffn=FFN)
    assert student(_ids()).logits.shape == (2, 12, V)
    # the kept heads' weights are the teacher's, in order
    q_teacher, q_student = teacher.model.layers[1].self_attn.q_proj, student.model.layers[1].self_attn.q_proj
    rows = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in query[1]])
    assert torch.equal(q_student.weight, q_teacher.weight[rows])
    if name == "qwen2":
        assert torch.equal(q_student.bias, q_teacher.bias[rows])


def test_pruned_students_through_the_command(tmp_path, store, llama_dir, gpt2_dir):
    out = tmp_path / "llama"
    result = CliRunner().invoke(main, ["--teacher", str(llama_dir), "--output", str(out), "--layers", "1",
                                       "--layer-importance", "--heads", "0.5", "--ffn", "48", "--store", str(store),
                                       "--calibration-samples", "8"])
    assert result.exit_code == 0, result.output
    assert "heads   2 of 4 query heads, 2 of 2 KV heads per layer" in result.output
    student = _loads_cleanly(out)
    assert student.num_parameters() == llama_parameters("llama", layers=1, heads=2, kv_heads=2, ffn=48)
    assert student(_ids()).logits.shape == (2, 12, V)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(llama_dir).get_vocab()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["parameters"] == {"teacher": llama_parameters("llama", layers=2, heads=4, kv_heads=2, ffn=FFN),
                                    "student": student.num_parameters(),
                                    "compression_ratio": report["parameters"]["teacher"] / student.num_parameters()}
    assert len(report["layers"]["kept"]) == 1 and len(report["layers"]["importance"]) == 2
    assert report["heads"]["query_heads"] == 2 and len(report["heads"]["kept_query_heads"]) == 1
    assert report["ffn"] == {"width": 48, "teacher_width": FFN} and report["calibration"]["samples"] == 8

    out = tmp_path / "gpt2"
    result = CliRunner().invoke(main, ["--teacher", str(gpt2_dir), "--output", str(out), "--keep-layers", "-1",
                                       "--ffn", "0.25", "--store", str(store), "--calibration-samples", "4"])
    assert result.exit_code == 0, result.output
    student = _loads_cleanly(out)
    assert student.config.n_layer == 1 and student.config.n_inner == 64
    assert student.num_parameters() == gpt2_parameters(layers=1, ffn=64, positions=512)
    assert student(_ids()).logits.shape == (2, 12, V)


def test_keeping_layers_needs_no_store(tmp_path, llama_dir):
    prune_teacher(StudentInitConfig(teacher=str(llama_dir), output=str(tmp_path / "student"), layers=1))
    assert _loads_cleanly(tmp_path / "student").config.num_hidden_layers == 1
    assert evenly_spaced(8, 4) == [0, 2, 4, 6] and evenly_spaced(6, 4) == [0, 1, 3, 4]
    assert evenly_spaced(3, 3) == [0, 1, 2]


# --- importance ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kv_heads", [("llama", 2), ("qwen2", 2), ("llama", 4)])
@torch.no_grad()
def test_dead_heads_and_channels_are_pruned_first(batches, name, kv_heads):
    """Heads whose output projection is zero and channels whose up projection is zero score exactly 0 and are the
    ones pruned; as they added nothing, the pruned model computes what the teacher did."""
    teacher = _llama_family(name, kv_heads=kv_heads)
    dead_heads, dead_channels = [[1, 2], [0, 3]], [[5, 70, 127], [0, 1, 64]]  # one head per KV group of 2
    for layer, block in enumerate(teacher.model.layers):
        for head in dead_heads[layer]:
            block.self_attn.o_proj.weight[:, head * 16:(head + 1) * 16] = 0
        block.mlp.up_proj.weight[dead_channels[layer]] = 0
    family = find_family(teacher)
    shape = shape_of(teacher, family)
    with torch.enable_grad():
        scores = head_and_channel_importance(teacher, family, batches, heads=True, channels=True)
    for layer in range(2):
        assert [scores.heads[layer][h] for h in dead_heads[layer]] == [0.0, 0.0]
        assert min(s for h, s in enumerate(scores.heads[layer]) if h not in dead_heads[layer]) > 0
        assert [scores.channels[layer][c] for c in dead_channels[layer]] == [0.0, 0.0, 0.0]
        assert min(s for c, s in enumerate(scores.channels[layer]) if c not in dead_channels[layer]) > 0
    kept = [choose_heads(layer, shape, 2) for layer in scores.heads]
    assert [query for query, _ in kept] == [[0, 3], [1, 2]]
    # with GQA every KV head keeps one query head; with MHA (4 KV heads) the dead heads' groups go
    assert [kv for _, kv in kept] == ([[0, 1], [0, 1]] if kv_heads == 2 else [[0, 3], [1, 2]])
    channels = [top_channels(layer, FFN - 3) for layer in scores.channels]
    assert [sorted(set(range(FFN)) - set(c)) for c in channels] == dead_channels
    student = prune(teacher, family, query_heads=[q for q, _ in kept], kv_heads=[kv for _, kv in kept],
                    channels=channels)
    torch.testing.assert_close(student(_ids()).logits, teacher(_ids()).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dead_gpt2_channels_are_pruned_first(batches):
    teacher = _gpt2()
    dead = [[3, 100], [0, 255]]
    for layer, block in enumerate(teacher.transformer.h):
        block.mlp.c_fc.weight[:, dead[layer]] = 0  # Conv1D: [in, out]
        block.mlp.c_fc.bias[dead[layer]] = 0  # gelu(0) = 0
    family = find_family(teacher)
    scores = head_and_channel_importance(teacher, family, batches, heads=False, channels=True)
    assert scores.heads is None
    channels = [top_channels(layer, 254) for layer in scores.channels]
    assert [sorted(set(range(256)) - set(c)) for c in channels] == dead
    student = prune(teacher, family, channels=channels)
    assert student.config.n_inner == 254
    torch.testing.assert_close(student(_ids()).logits, teacher(_ids()).logits, rtol=1e-4, atol=1e-4)


def _ce64(model, batch) -> float:
    """Mean CE over the batch's trained positions, with float64 logits over the whole vocabulary."""
    hidden = model.base_model(input_ids=batch["input_ids"][:, :-1],
                              attention_mask=batch["attention_mask"][:, :-1].long()).last_hidden_state
    logits = model.lm_head(hidden)[batch["loss_mask"]]
    return float(torch.nn.functional.cross_entropy(logits, batch["input_ids"][:, 1:][batch["loss_mask"]]))


def test_head_importance_is_the_derivative_of_the_loss_by_a_heads_scale(batches):
    """One sample: a head's score is |dL/ds| for its output scaled by s, here by central finite differences."""
    teacher = _llama_family("llama").double()
    one = {key: value[:1] for key, value in batches[0].items()}
    scores = head_and_channel_importance(teacher, find_family(teacher), [one], heads=True, channels=False)
    for layer in range(2):
        o_proj = teacher.model.layers[layer].self_attn.o_proj
        for head in range(4):
            columns = slice(head * 16, (head + 1) * 16)
            original, losses = o_proj.weight.data.clone(), []
            with torch.no_grad():
                for scale in (1 + 1e-2, 1 - 1e-2):  # not smaller: RMSNorm rounds to float32
                    o_proj.weight.data[:, columns] = original[:, columns] * scale
                    losses.append(_ce64(teacher, one))
            o_proj.weight.data = original
            assert scores.heads[layer][head] == pytest.approx(abs(losses[0] - losses[1]) / 2e-2, rel=1e-3)


@torch.no_grad()
def test_channel_importance_is_the_mean_activation_magnitude(batches):
    teacher = _llama_family("llama")
    scores = head_and_channel_importance(teacher, find_family(teacher), batches, heads=False, channels=True)
    mlp, inputs = teacher.model.layers[0].mlp, []
    handle = mlp.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    sums, tokens = torch.zeros(FFN, dtype=torch.float64), 0
    for batch in batches:
        inputs.clear()
        teacher(input_ids=batch["input_ids"][:, :-1], attention_mask=batch["attention_mask"][:, :-1].long())
        real = batch["attention_mask"][:, :-1]
        act = torch.nn.functional.silu(mlp.gate_proj(inputs[0])) * mlp.up_proj(inputs[0])
        sums, tokens = sums + act[real].abs().double().sum(0), tokens + int(real.sum())
    handle.remove()
    torch.testing.assert_close(torch.tensor(scores.channels[0], dtype=torch.float64), sums / tokens)


@torch.no_grad()
def test_block_importance_is_the_loss_without_the_block(batches):
    teacher = _llama_family("llama", layers=3)
    block = teacher.model.layers[1]
    block.self_attn.o_proj.weight.zero_()  # the block adds nothing: an identity
    block.mlp.down_proj.weight.zero_()
    scores = block_importance(teacher, batches)
    assert scores[1] == 0.0
    base = mean_loss(teacher, batches)
    for layer in (0, 2):
        without = select_layers(teacher, [i for i in range(3) if i != layer])
        assert scores[layer] == pytest.approx(mean_loss(without, batches) - base, abs=1e-5)


def test_head_counts_and_fractions():
    grouped = _llama_family("llama", heads=8, kv_heads=2)
    shape = shape_of(grouped, find_family(grouped))
    assert head_counts(shape) == [2, 4, 6, 8]  # multiples of 2 KV heads, of 4 query heads per KV head
    assert _head_count(0.5, shape) == 4 and _head_count(0.3, shape) == 2 and _head_count(0.625, shape) == 6
    scores = [0, 5, 1, 2, 9, 8, 7, 6]
    assert choose_heads(scores, shape, 2) == ([1, 4], [0, 1])  # the best query head of each KV group
    assert choose_heads(scores, shape, 4) == ([1, 3, 4, 5], [0, 1])
    with pytest.raises(ValueError, match="cannot keep 3 of 8 query heads with 2 KV heads.*one of 2, 4, 6, 8"):
        choose_heads(scores, shape, 3)
    pairs = _llama_family("llama", heads=8, kv_heads=4)
    shape = shape_of(pairs, find_family(pairs))
    assert head_counts(shape) == [2, 4, 6, 8]
    assert choose_heads(scores, shape, 2) == ([4, 5], [2])  # whole groups, by summed importance: 5, 3, 17, 13
    assert choose_heads(scores, shape, 6) == ([0, 1, 4, 5, 6, 7], [0, 2, 3])
    assert choose_heads(scores, shape, 4) == ([1, 3, 4, 6], [0, 1, 2, 3])


# --- the command and its errors -----------------------------------------------------------------------------------


def test_help_teaches_the_recipe():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for text in ("--keep-layers", "--layer-importance", "--heads", "--ffn", "--store", "Taylor", "KV heads",
                 REPORT_NAME):
        assert text in result.output


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=H, intermediate_size=FFN, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=128))
    return _save(model, tmp_path_factory.mktemp("neox"))


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory) -> Path:
    """A teacher that predicts fewer ids than the store's vocabulary."""
    return _save(_llama_family("llama", vocab_size=1000), tmp_path_factory.mktemp("small-vocab"))


@pytest.mark.parametrize("args, message", [
    (["--heads", "2"], "heads: importance is measured on a calibration slice of a store.*--store STORE"),
    (["--layers", "1", "--layer-importance"], "layer_importance: importance is measured"),
    (["--keep-layers", "0", "--layers", "1"], "keep_layers and layers both given"),
    (["--layer-importance"], "say how many layers to keep"),
    (["--keep-layers", "0,x"], "keep_layers: expected layer indices"),
    (["--keep-layers", "0,5"], "keep_layers: layer 5 out of range: the model has 2 layers"),
    (["--layers", "3"], "layers: cannot keep 3 layers, the teacher has 2"),
    (["--heads", "0", "--store", "STORE"], r"heads: expected a count \(an integer >= 1\) or a fraction"),
    (["--ffn", "1.5", "--store", "STORE"], "ffn: expected a count"),
    (["--heads", "abc"], "expected a count .2. or a fraction .0.5."),
    (["--heads", "3", "--store", "STORE"], "cannot keep 3 of 4 query heads with 2 KV heads.*one of 2, 4"),
    (["--ffn", "129", "--store", "STORE"], "ffn: cannot keep 129 FFN channels, the teacher has 128"),
    (["--teacher", "gpt2_dir", "--heads", "2", "--store", "STORE"], "heads: GPT-2 ties the head size"),
    (["--teacher", "neox_dir", "--ffn", "0.5", "--store", "STORE"],
     r"GPTNeoXForCausalLM \(model_type 'gpt_neox'\) is not supported.*Llama-like \(llama, mistral, qwen2, qwen3\); "
     r"GPT-2 \(gpt2\)"),
    (["--teacher", "small_vocab_dir", "--ffn", "0.5", "--store", "STORE"], "--store: its tokens are not the teacher"),
    (["--teacher", "missing"], "teacher: missing is not an HF model directory"),
])
def test_bad_options_are_refused(request, tmp_path, store, args, message):
    args = [str(store) if arg == "STORE" else arg for arg in args]
    if "--teacher" not in args:
        args += ["--teacher", "llama_dir"]
    args = [str(request.getfixturevalue(arg)) if arg.endswith("_dir") else arg for arg in args]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "student")])
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "student").exists()


def test_a_non_empty_output_is_refused(tmp_path, llama_dir):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "weights").write_text("mine")
    result = CliRunner().invoke(main, ["--teacher", str(llama_dir), "--output", str(tmp_path / "student")])
    assert result.exit_code == 2 and "output: " in result.output and "exists and is not empty" in result.output
    assert (tmp_path / "student" / "weights").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty one is filled
    result = CliRunner().invoke(main, ["--teacher", str(llama_dir), "--output", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "empty" / REPORT_NAME).exists()
