"""Prompts for `teacher-cache generate`: the rows of a dataset as the conversations a model answers, and their tokens.

A row becomes the turns the model replies to (`prompt_turns`):
- `text`: one user turn, the text itself or `--prompt-template` with `{text}` replaced by it (so raw text becomes
  instructions: "Explain this code:\\n\\n{text}");
- `messages`: the conversation up to its last user turn; the replies after it are dropped (they are what the model
  writes anew);
- `prompt-completion`: the prompt (a string is one user turn); the completion is dropped.
`PromptEncoder` renders the turns with the chat template and its generation prompt, as the model is asked to answer,
and tokenizes them as `storage.conversations.ChatEncoder` does (the template writes the special tokens).
"""

from __future__ import annotations

import jinja2

from storage.conversations import check_messages, resolve_template
from storage.dataset_options import Columns
from storage.samples import has_text

TEXT_SLOT = "{text}"


def prompt_turns(row: dict, fmt: str, fields: Columns, index: int, prompt_template: str | None) -> list[dict] | None:
    """The turns of a row the model answers; None for a row without text (skipped and counted by the caller).

    Raises:
        ValueError: a conversation without a user turn, invalid messages (`check_messages`), or turns that carry
            tool calls (a generated dataset holds role and content only).
    """
    if fmt == "text":
        text = row[fields.text]
        if not has_text(text):
            return None
        return [{"role": "user", "content": text if prompt_template is None else
                 prompt_template.replace(TEXT_SLOT, text)}]
    part = row[fields.messages] if fmt == "messages" else row[fields.prompt]
    if part is None or part == []:
        return None
    turns = [{"role": "user", "content": part}] if isinstance(part, str) else [
        {key: value for key, value in m.items() if value is not None} for m in part]
    users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
    if not users:
        raise ValueError(f"row {index} has no user turn to answer; give each prompt a user turn, or remove the row.")
    turns = turns[: users[-1] + 1]
    check_messages(turns, index)
    for i, message in enumerate(turns):
        if set(message) - {"role", "content"}:
            raise ValueError(f"row {index}, message {i} carries {', '.join(sorted(set(message) - {'role', 'content'}))}"
                             "; generated datasets hold each turn's role and content only. Remove those keys (or the "
                             "turn) from the prompts.")
    return turns


class PromptEncoder:
    """Renders prompt turns with a chat template and its generation prompt, and tokenizes them.

    Raises:
        ValueError: (on creation) the tokenizer has no chat template and none is given.
    """

    def __init__(self, tokenizer, template: str | None):
        self.tokenizer = tokenizer
        self.template = resolve_template(tokenizer, template)

    def encode(self, turns: list[dict], index: int) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(turns, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        except jinja2.TemplateError as exc:
            raise ValueError(f"row {index}: the chat template failed on it ({exc}); fix the row, or give a template "
                             "that accepts it with --chat-template FILE.") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
