"""Conversations as samples: dataset shapes, chat templates, which tokens are trained, and their samples.

Expected masks are written out by hand from the rendered text, as the tokens of the real Llama-2 tokenizer with a
`*` before each trained one. The templates are written here: a ChatML one like SmolLM2's (a default system prompt
when none is given) and a Llama-2 one (`[INST] ... [/INST] answer </s>`). Packed and unpacked samples are checked
against a brute-force cut of the hand-written documents.
"""

from __future__ import annotations

import copy
import json
import logging

import datasets
import numpy as np
import pytest
from conftest import TOKENIZER_DIR
from transformers import AutoTokenizer

from storage import conversations
from storage.conversations import ChatConfig, ChatEncoder, template_sha256
from storage.dataset_options import Columns, detect_format
from storage.samples import iter_rows, load_samples_dataset

CHATML = (  # SmolLM2's template, with a shorter default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_MARKED = CHATML.replace(  # the same text, with generation markers around each assistant reply
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}",
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
CHATML_TOOLS = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + call.function.name + '</tool_call>' }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = false %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system %}{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Earlier assistant turns lose their reasoning, the last keeps it: a prefix of the turns is no prefix of the whole.
STRIPS_HISTORY = (
    "{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "And you?"},
    {"role": "assistant", "content": "Fine."},
]
SYSTEM = [{"role": "system", "content": "Be brief."}]

# ChatML, TWO_TURNS, default system prompt; EOS appended (not trained). Replies: assistant, last-assistant, all.
CHATML_ASSISTANT = (
    "<|im_start|> system <0x0A> You ▁are ▁Sm ol LM . <|im_end|> <0x0A> <|im_start|> user <0x0A> Hi <|im_end|> <0x0A> "
    "<|im_start|> ass istant <0x0A> *Hello *! *<|im_end|> *<0x0A> <|im_start|> user <0x0A> And ▁you ? <|im_end|> "
    "<0x0A> <|im_start|> ass istant <0x0A> *F *ine *. *<|im_end|> *<0x0A> </s>")
CHATML_LAST = (
    "<|im_start|> system <0x0A> You ▁are ▁Sm ol LM . <|im_end|> <0x0A> <|im_start|> user <0x0A> Hi <|im_end|> <0x0A> "
    "<|im_start|> ass istant <0x0A> Hello ! <|im_end|> <0x0A> <|im_start|> user <0x0A> And ▁you ? <|im_end|> "
    "<0x0A> <|im_start|> ass istant <0x0A> *F *ine *. *<|im_end|> *<0x0A> </s>")
CHATML_ALL = (
    "*<|im_start|> *system *<0x0A> *You *▁are *▁Sm *ol *LM *. *<|im_end|> *<0x0A> *<|im_start|> *user *<0x0A> *Hi "
    "*<|im_end|> *<0x0A> *<|im_start|> *ass *istant *<0x0A> *Hello *! *<|im_end|> *<0x0A> *<|im_start|> *user *<0x0A> "
    "*And *▁you *? *<|im_end|> *<0x0A> *<|im_start|> *ass *istant *<0x0A> *F *ine *. *<|im_end|> *<0x0A> </s>")
# Llama-2, SYSTEM + TWO_TURNS: the template writes BOS and EOS itself, so no EOS is appended.
LLAMA2_ASSISTANT = (
    "<s> [ INST ] ▁<< SY S >> <0x0A> Be ▁brief . <0x0A> < </ SY S >> <0x0A> <0x0A> Hi ▁[ / INST ] *▁Hello *! *▁ *</s> "
    "<s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ *</s>")
LLAMA2_LAST = (
    "<s> [ INST ] ▁<< SY S >> <0x0A> Be ▁brief . <0x0A> < </ SY S >> <0x0A> <0x0A> Hi ▁[ / INST ] ▁Hello ! ▁ </s> "
    "<s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ *</s>")
LLAMA2_ALL = (
    "*<s> *[ *INST *] *▁<< *SY *S *>> *<0x0A> *Be *▁brief *. *<0x0A> *< *</ *SY *S *>> *<0x0A> *<0x0A> *Hi *▁[ */ "
    "*INST *] *▁Hello *! *▁ *</s> *<s> *[ *INST *] *▁And *▁you *? *▁[ */ *INST *] *▁Fine *. *▁ *</s>")


@pytest.fixture(scope="module")
def llama_tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def chatml_tok():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def parse(spec: str) -> tuple[list[str], list[bool]]:
    """'a *b c' -> tokens [a, b, c], trained [F, T, F]."""
    marked = spec.split(" ")
    return [t.removeprefix("*") for t in marked], [t.startswith("*") for t in marked]


def encoder(tokenizer, template: str, fmt: str = "messages", **options) -> ChatEncoder:
    return ChatEncoder(tokenizer, ChatConfig(chat_template=template, **options), fmt)


def document(chat: ChatEncoder, row: dict, seq_len: int = 1000) -> tuple[list[str], list[bool]]:
    ids, trained = chat.document(row, 0, seq_len, list(row))
    return chat.tokenizer.convert_ids_to_tokens(ids), trained


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("train_on,expected", [
    ("assistant", CHATML_ASSISTANT), ("last-assistant", CHATML_LAST), ("completion", CHATML_LAST),
    ("all", CHATML_ALL)])
def test_chatml_masks(chatml_tok, train_on, expected):
    """SmolLM2-style: the default system prompt and assistant headers are not trained, the reply and its end are."""
    assert document(encoder(chatml_tok, CHATML, train_on=train_on), {"messages": TWO_TURNS}) == parse(expected)


def test_a_reply_ends_with_the_end_of_turn_token(chatml_tok):
    """With <|im_end|> as EOS (as SmolLM2's tokenizer has it), a reply trains through it and not the newline the
    template writes after it, which the model never generates."""
    tokenizer = copy.deepcopy(chatml_tok)
    tokenizer.eos_token = "<|im_end|>"
    assert document(encoder(tokenizer, CHATML), {"messages": TWO_TURNS}) == parse(
        "<|im_start|> system <0x0A> You ▁are ▁Sm ol LM . <|im_end|> <0x0A> <|im_start|> user <0x0A> Hi <|im_end|> "
        "<0x0A> <|im_start|> ass istant <0x0A> *Hello *! *<|im_end|> <0x0A> <|im_start|> user <0x0A> And ▁you ? "
        "<|im_end|> <0x0A> <|im_start|> ass istant <0x0A> *F *ine *. *<|im_end|> <0x0A> <|im_end|>")


@pytest.mark.parametrize("train_on,expected", [
    ("assistant", LLAMA2_ASSISTANT), ("last-assistant", LLAMA2_LAST), ("completion", LLAMA2_LAST),
    ("all", LLAMA2_ALL)])
def test_llama2_masks(llama_tok, train_on, expected):
    chat = encoder(llama_tok, LLAMA2, train_on=train_on)
    assert document(chat, {"messages": SYSTEM + TWO_TURNS}) == parse(expected)


@pytest.mark.parametrize("train_on,expected", [
    ("completion", "<s> [ INST ] ▁Hi ▁[ / INST ] ▁Hello ! ▁ </s> <s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ "
                   "*</s>"),
    ("assistant", "<s> [ INST ] ▁Hi ▁[ / INST ] *▁Hello *! *▁ *</s> <s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ "
                  "*</s>"),
])
def test_prompt_completion_rows(llama_tok, train_on, expected):
    """A prompt of messages and a completion string: `completion` trains the completion only."""
    row = {"prompt": TWO_TURNS[:3], "completion": "Fine."}
    chat = encoder(llama_tok, LLAMA2, "prompt-completion", train_on=train_on)
    assert document(chat, row) == parse(expected)


def test_prompt_completion_strings(llama_tok):
    """A prompt string is one user turn, a completion string one assistant turn."""
    chat = encoder(llama_tok, LLAMA2, "prompt-completion", train_on="completion")
    assert document(chat, {"prompt": "Hi", "completion": "Hello!"}) == parse(
        "<s> [ INST ] ▁Hi ▁[ / INST ] *▁Hello *! *▁ *</s>")


TOOL_TURNS = [
    {"role": "user", "content": "Time?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "clock"}}]},
    {"role": "tool", "content": "12:00"},
    {"role": "assistant", "content": "Noon."},
]


@pytest.mark.parametrize("train_on,expected", [
    ("assistant",
     "<|im_start|> user <0x0A> Time ? <|im_end|> <0x0A> <|im_start|> ass istant <0x0A> < tool _ call > clock </ tool "
     "_ call > <|im_end|> <0x0A> <|im_start|> tool <0x0A> 1 2 : 0 0 <|im_end|> <0x0A> <|im_start|> ass istant <0x0A> "
     "*No *on *. *<|im_end|> *<0x0A> </s>"),
    ("all",
     "*<|im_start|> *user *<0x0A> *Time *? *<|im_end|> *<0x0A> *<|im_start|> *ass *istant *<0x0A> *< *tool *_ *call "
     "*> *clock *</ *tool *_ *call *> *<|im_end|> *<0x0A> *<|im_start|> *tool *<0x0A> *1 *2 *: *0 *0 *<|im_end|> "
     "*<0x0A> *<|im_start|> *ass *istant *<0x0A> *No *on *. *<|im_end|> *<0x0A> </s>"),
])
def test_tool_calls_and_outputs_are_masked(chatml_tok, train_on, expected):
    """An assistant turn that calls a tool (empty content allowed) and the tool's output are not trained."""
    assert document(encoder(chatml_tok, CHATML_TOOLS, train_on=train_on), {"messages": TOOL_TURNS}) == parse(expected)


# ------------------------------------------------------------------------------------- generation markers

CONVERSATIONS = [TWO_TURNS, SYSTEM + TWO_TURNS, TWO_TURNS[:2], SYSTEM + TWO_TURNS[:2] + TWO_TURNS]


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "all"])
def test_generation_markers_agree_with_alignment(chatml_tok, train_on):
    """The same text with and without {% generation %}: transformers' mask and the prefix alignment agree."""
    marked, aligned = (encoder(chatml_tok, t, train_on=train_on) for t in (CHATML_MARKED, CHATML))
    assert marked.marked and not aligned.marked
    for messages in CONVERSATIONS:
        ids, trained = marked.document({"messages": messages}, 0, 1000, ["messages"])
        assert (ids, trained) == aligned.document({"messages": messages}, 0, 1000, ["messages"])
        assert any(trained) and not all(trained[:-1]) or train_on == "all"


def test_generation_markers_decide(chatml_tok):
    """Markers around the content only: the end marker is then not trained, and last-assistant keeps the last block."""
    template = CHATML_MARKED.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' + '\n' }}")
    chat = encoder(chatml_tok, template, train_on="last-assistant")
    assert document(chat, {"messages": TWO_TURNS}) == parse(
        "<|im_start|> system <0x0A> You ▁are ▁Sm ol LM . <|im_end|> <0x0A> <|im_start|> user <0x0A> Hi <|im_end|> "
        "<0x0A> <|im_start|> ass istant <0x0A> Hello ! <|im_end|> <0x0A> <|im_start|> user <0x0A> And ▁you ? "
        "<|im_end|> <0x0A> <|im_start|> ass istant <0x0A> *F *ine *. <|im_end|> <0x0A> </s>")


TOOL_CALL = "{% for call in message.tool_calls %}{{ '<tool_call>' + call.function.name + '</tool_call>' }}{% endfor %}"
GENERATION_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
TOOLS_MARKED_EVERY_TURN = (  # CHATML_TOOLS's text; every assistant turn, tool calls included, in a generation block
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{% if message.tool_calls %}" + TOOL_CALL +
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}" + GENERATION_PROMPT)
TOOLS_MARKED_REPLIES = (  # CHATML_TOOLS's text; only replies without tool calls in a generation block
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.tool_calls %}" + TOOL_CALL + "{{ '<|im_end|>\n' }}{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}" + GENERATION_PROMPT)


@pytest.mark.parametrize("template", [TOOLS_MARKED_EVERY_TURN, TOOLS_MARKED_REPLIES])
def test_generation_markers_with_tool_calls(chatml_tok, template):
    """Whether or not the template marks tool-call turns, only the reply without tools is trained."""
    chat = encoder(chatml_tok, template)
    assert chat.marked
    expected = document(encoder(chatml_tok, CHATML_TOOLS), {"messages": TOOL_TURNS})
    assert document(chat, {"messages": TOOL_TURNS}) == expected
    assert sum(expected[1]) == 5  # No on . <|im_end|> <0x0A>


def test_generation_markers_that_miss_turns(chatml_tok):
    """A template that marks only the last reply cannot say which tokens the first reply has."""
    template = CHATML_MARKED.replace("{% if message['role'] == 'assistant' %}",
                                     "{% if message['role'] == 'assistant' and loop.last %}")
    with pytest.raises(ValueError, match=r"row 0: the chat template marks 1 \{% generation %\} blocks for 2 "
                                         r"assistant turns \(2 without tool calls\)"):
        document(encoder(chatml_tok, template), {"messages": TWO_TURNS})


# ------------------------------------------------------------------------------------------------ samples


def docs_by_hand(tokenizer) -> list[tuple[list[int], list[bool]]]:
    """The documents of ROWS (Llama-2 template, train_on assistant), written out by hand."""
    specs = ["<s> [ INST ] ▁Hi ▁[ / INST ] *▁Hello *! *▁ *</s>",
             "<s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ *</s>",
             "<s> [ INST ] ▁Hi ▁[ / INST ] *▁Hello *! *▁ *</s> <s> [ INST ] ▁And ▁you ? ▁[ / INST ] *▁Fine *. *▁ *</s>"]
    return [(tokenizer.convert_tokens_to_ids(tokens), flags) for tokens, flags in map(parse, specs)]


ROWS = [TWO_TURNS[:2], TWO_TURNS[2:], TWO_TURNS]


def collect(blocks) -> dict[str, np.ndarray]:
    blocks = list(blocks)
    return {name: np.concatenate([getattr(b, name) for b in blocks])
            for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids")}


@pytest.mark.parametrize("seq_len", [28, 40])
def test_packed_conversations(llama_tok, seq_len):
    """Stride-L cuts of the stream of documents (13, 16 and 29 tokens: none too long, the last fills L + 1 at
    L = 28); loss_mask[t] is the trained flag of token t + 1."""
    stream, flags, doc_of = [], [], []
    for d, (ids, trained) in enumerate(docs_by_hand(llama_tok)):
        stream, flags, doc_of = stream + ids, flags + trained, doc_of + [d] * len(ids)
    L, n = seq_len, -(-(len(stream) - 1) // seq_len)
    chat = encoder(llama_tok, LLAMA2)
    rows = collect(iter_rows(datasets.Dataset.from_dict({"messages": ROWS}), llama_tok, text_field="text",
                             seq_len=L, pack=True, chat=chat))
    assert len(rows["input_ids"]) == n
    for i in range(n):
        window = range(i * L, min(i * L + L + 1, len(stream)))
        real = len(window)
        np.testing.assert_array_equal(rows["input_ids"][i], [stream[p] for p in window] + [2] * (L + 1 - real))
        np.testing.assert_array_equal(rows["attention_mask"][i], np.arange(L + 1) < real)
        np.testing.assert_array_equal(rows["loss_mask"][i], [flags[p] for p in window][1:] + [False] * (L + 1 - real))
        segments = [doc_of[p] - doc_of[window[0]] for p in window]
        np.testing.assert_array_equal(rows["segment_ids"][i], segments + [segments[-1]] * (L + 1 - real))
    assert (chat.counts.encoded, chat.counts.skipped, chat.counts.truncated, chat.counts.dropped) == (3, 0, 0, 0)


def test_unpacked_conversations(llama_tok):
    """One conversation per sample, padded; the target after the last token is padding, never trained."""
    L = 30
    rows = collect(iter_rows(datasets.Dataset.from_dict({"messages": ROWS}), llama_tok, text_field="text",
                             seq_len=L, pack=False, chat=encoder(llama_tok, LLAMA2)))
    docs = docs_by_hand(llama_tok)
    assert len(rows["input_ids"]) == 3 and max(len(ids) for ids, _ in docs) <= L + 1
    for i, (ids, trained) in enumerate(docs):
        pad = L + 1 - len(ids)
        np.testing.assert_array_equal(rows["input_ids"][i], ids + [2] * pad)
        np.testing.assert_array_equal(rows["attention_mask"][i], [True] * len(ids) + [False] * pad)
        np.testing.assert_array_equal(rows["loss_mask"][i], trained[1:] + [False] * pad)
    assert (rows["segment_ids"] == 0).all()
    # The first: 13 tokens, tokens 9..12 (▁Hello ! ▁ </s>) are trained, so positions 8..11 are.
    np.testing.assert_array_equal(np.flatnonzero(rows["loss_mask"][0]), [8, 9, 10, 11])


def test_appended_eos_is_not_trained(chatml_tok):
    """Packed ChatML documents end with an appended EOS, whose position as a target is masked."""
    L = 64
    rows = collect(iter_rows(datasets.Dataset.from_dict({"messages": [TWO_TURNS[:2]] * 2}), chatml_tok,
                             text_field="text", seq_len=L, pack=True, chat=encoder(chatml_tok, CHATML)))
    tokens, flags = parse(CHATML_ASSISTANT.split(" <|im_start|> user <0x0A> And")[0] + " </s>")
    ids = chatml_tok.convert_tokens_to_ids(tokens)
    assert tokens[-3:] == ["<|im_end|>", "<0x0A>", "</s>"] and flags[-3:] == [True, True, False]
    np.testing.assert_array_equal(rows["input_ids"][0, : 2 * len(ids)], ids * 2)
    np.testing.assert_array_equal(rows["loss_mask"][0, : 2 * len(ids) - 1], (flags + flags)[1:])


@pytest.mark.parametrize("pack", [True, False])
def test_overlong_truncate(llama_tok, pack):
    """seq_len 10: each conversation (13, 16, 29 tokens) keeps its first 11 tokens."""
    chat = encoder(llama_tok, LLAMA2)
    rows = collect(iter_rows(datasets.Dataset.from_dict({"messages": ROWS}), llama_tok, text_field="text",
                             seq_len=10, pack=pack, chat=chat))
    assert (chat.counts.encoded, chat.counts.truncated, chat.counts.dropped) == (3, 3, 0)
    first = parse("<s> [ INST ] ▁Hi ▁[ / INST ] *▁Hello *!")
    ids = llama_tok.convert_tokens_to_ids(first[0])
    np.testing.assert_array_equal(rows["input_ids"][0], ids)
    np.testing.assert_array_equal(rows["loss_mask"][0], first[1][1:])
    if pack:  # then EOS (appended, not trained), then the second conversation
        np.testing.assert_array_equal(rows["input_ids"][1][:3], [ids[-1], 2, 1])
        np.testing.assert_array_equal(rows["loss_mask"][1][:2], [False, False])
    else:
        assert len(rows["input_ids"]) == 3


@pytest.mark.parametrize("pack", [True, False])
def test_overlong_drop(llama_tok, pack):
    """seq_len 15: the first conversation (13 tokens) and the second (16 = L + 1) fit, the third (29) is dropped."""
    chat = encoder(llama_tok, LLAMA2, overlong="drop")
    rows = collect(iter_rows(datasets.Dataset.from_dict({"messages": ROWS}), llama_tok, text_field="text",
                             seq_len=15, pack=pack, chat=chat))
    assert (chat.counts.encoded, chat.counts.truncated, chat.counts.dropped) == (2, 0, 1)
    kept = [ids for ids, _ in docs_by_hand(llama_tok)[:2]]
    if pack:
        stream = [t for row in rows["input_ids"][:-1] for t in row[:15]] + list(rows["input_ids"][-1][
            rows["attention_mask"][-1]])
        assert stream == kept[0] + kept[1]
    else:
        assert [list(row[mask]) for row, mask in zip(rows["input_ids"], rows["attention_mask"], strict=True)] == kept


# ------------------------------------------------------------------------------------------------ bad input


def rows_of(chat, messages_per_row, seq_len=1000):
    return collect(iter_rows(datasets.Dataset.from_dict({"messages": messages_per_row}), chat.tokenizer,
                             text_field="text", seq_len=seq_len, pack=False, chat=chat))


@pytest.mark.parametrize("bad", [
    [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],  # row 4, message 1: unknown role
    [TWO_TURNS[0], {"role": "assistant", "content": "<think>hm</think>Hello!"}] + TWO_TURNS[2:],  # not aligned
])
def test_bad_row_stops_before_the_first_sample(chatml_tok, monkeypatch, bad):
    """Row 4 of 5, in the third block of two rows: refused before a sample of the first block comes out."""
    monkeypatch.setattr(conversations, "ROWS_PER_BLOCK", 2)
    dataset = datasets.Dataset.from_dict({"messages": [TWO_TURNS] * 4 + [bad]})
    rows = iter_rows(dataset, chatml_tok, text_field="text", seq_len=8, pack=True,
                     chat=encoder(chatml_tok, STRIPS_HISTORY))
    with pytest.raises(ValueError, match=r"row 4, message 1: "):
        next(rows)


def test_unknown_role(llama_tok):
    bad = [TWO_TURNS, [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]]
    with pytest.raises(ValueError, match=r"row 1, message 1: unknown role 'bot'; expected one of system, user, "
                                         r"assistant, tool"):
        rows_of(encoder(llama_tok, LLAMA2), bad)


@pytest.mark.parametrize("content", ["", "  \n"])
def test_empty_content(llama_tok, content):
    bad = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": content}]]
    with pytest.raises(ValueError, match=r"row 0, message 1 \(assistant\) has empty content; remove the message"):
        rows_of(encoder(llama_tok, LLAMA2), bad)


@pytest.mark.parametrize("train_on", ["assistant", "last-assistant", "completion"])
def test_no_assistant_turn_skipped_or_refused(llama_tok, train_on):
    only_user = [{"role": "user", "content": "Hi"}]
    chat = encoder(llama_tok, LLAMA2, train_on=train_on)
    rows = rows_of(chat, [TWO_TURNS[:2], only_user, TWO_TURNS[2:]])
    assert len(rows["input_ids"]) == 2 and (chat.counts.encoded, chat.counts.skipped) == (2, 1)
    with pytest.raises(ValueError, match=r"row 1 has no assistant turn to train on \(--train-on"):
        rows_of(encoder(llama_tok, LLAMA2, train_on=train_on, strict=True), [TWO_TURNS[:2], only_user])


def test_no_chat_template(llama_tok):
    assert llama_tok.chat_template is None
    with pytest.raises(ValueError, match="the tokenizer has no chat template.*--chat-template FILE"):
        ChatEncoder(llama_tok, ChatConfig(), "messages")


def test_tokenizer_template_is_the_default():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.chat_template = LLAMA2
    chat = ChatEncoder(tokenizer, ChatConfig(train_on="last-assistant"), "messages")
    assert document(chat, {"messages": SYSTEM + TWO_TURNS}) == parse(LLAMA2_LAST)
    assert chat.manifest_entry() == {"format": "messages", "columns": ["messages"], "train_on": "last-assistant",
                                     "overlong": "truncate", "chat_template_sha256": template_sha256(LLAMA2)}


def test_template_sha256():
    assert template_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_unalignable_template(chatml_tok):
    """Refused with the row and message named, never trained as a whole; fine where no alignment is needed."""
    history = [TWO_TURNS[0], {"role": "assistant", "content": "<think>hm</think>Hello!"}] + TWO_TURNS[2:]
    with pytest.raises(ValueError, match=r"row 1, message 1: the chat template cannot be aligned.*\{% generation %\}"
                                         r".*--train-on all"):
        rows_of(encoder(chatml_tok, STRIPS_HISTORY), [TWO_TURNS, history])
    assert len(rows_of(encoder(chatml_tok, STRIPS_HISTORY, train_on="last-assistant"), [history])["input_ids"]) == 1
    assert rows_of(encoder(chatml_tok, STRIPS_HISTORY, train_on="all"), [history])["loss_mask"].any()


def test_conversation_opening_with_assistant(llama_tok):
    chat = encoder(llama_tok, LLAMA2)
    with pytest.raises(ValueError, match=r"row 0 opens with an assistant turn"):
        rows_of(chat, [[{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]])


def test_template_error_names_the_row(llama_tok):
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match=r"row 0: the chat template failed on it \(roles must alternate\)"):
        rows_of(encoder(llama_tok, template), [TWO_TURNS])


def test_mixed_formats(llama_tok):
    dataset = datasets.Dataset.from_dict({"messages": [TWO_TURNS, None], "text": [None, "plain text"]})
    with pytest.raises(ValueError, match=r"row 1 has no messages \(null or empty\), but the dataset is read as "
                                         r"messages \(columns: messages, text\)"):
        list(iter_rows(dataset, llama_tok, text_field="text", seq_len=64, pack=True,
                       chat=encoder(llama_tok, LLAMA2)))


def test_chat_config_choices():
    with pytest.raises(ValueError, match=r"--train-on 'everything': expected one of assistant, all"):
        ChatConfig(train_on="everything")
    with pytest.raises(ValueError, match=r"--overlong 'cut': expected one of truncate, drop"):
        ChatConfig(overlong="cut")


# ------------------------------------------------------------------------------------------ format detection


@pytest.mark.parametrize("columns,text_field,expected", [
    (["messages"], "text", "messages"),
    (["id", "prompt", "completion"], "text", "prompt-completion"),
    (["text", "id"], "text", "text"),
    (["body"], "body", "text"),
])
def test_detect_format(columns, text_field, expected, caplog):
    with caplog.at_level(logging.INFO, logger="storage.dataset_options"):
        assert detect_format(columns, fields=Columns(text=text_field)) == expected
    assert f"dataset format: {expected}" in caplog.text


def test_detect_format_without_text_or_conversation_columns_names_the_text_field():
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: body, id\); pass --text-field.*--format"):
        detect_format(["body", "id"])


@pytest.mark.parametrize("columns,found", [
    (["body", "messages_v2", "completion"], "none"),
    (["messages", "text"], "several formats: text, messages"),
    (["prompt", "completion", "messages"], "several formats: messages, prompt-completion"),
])
def test_detect_format_refuses(columns, found):
    with pytest.raises(ValueError, match=rf"has the columns {', '.join(columns)}, which fit {found}\..*"
                                         r"--format text\|messages\|prompt-completion"):
        detect_format(columns)


def test_requested_format_needs_its_columns():
    assert detect_format(["messages", "text"], "messages") == "messages"
    with pytest.raises(ValueError, match=r"--format prompt-completion needs the column\(s\) completion"):
        detect_format(["prompt", "text"], "prompt-completion")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: messages\); pass --text-field"):
        detect_format(["messages"], "text")


def test_load_jsonl_conversations(tmp_path, chatml_tok):
    """From a file: rows whose messages lack `tool_calls` get it as null from the shared schema; that is ignored."""
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in (TOOL_TURNS, TWO_TURNS[:2])) + "\n")
    dataset, fmt = load_samples_dataset(str(path), split="train")
    assert fmt == "messages"
    chat = encoder(chatml_tok, CHATML_TOOLS, train_on="assistant")
    rows = collect(iter_rows(dataset, chatml_tok, text_field="text", seq_len=64, pack=False, chat=chat))
    expected = parse("<|im_start|> user <0x0A> Hi <|im_end|> <0x0A> <|im_start|> ass istant <0x0A> *Hello *! "
                     "*<|im_end|> *<0x0A> </s>")
    second = rows["input_ids"][1][rows["attention_mask"][1]]
    assert chatml_tok.convert_ids_to_tokens(second.tolist()) == expected[0]
    np.testing.assert_array_equal(rows["loss_mask"][1][: len(second) - 1], expected[1][1:])
    assert rows["loss_mask"][0].sum() == 5  # the first row trains "Noon.<|im_end|>\n" only: No on . <|im_end|> \n
