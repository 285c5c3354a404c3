"""A deterministic byte-level tokenizer, chat templates, and readable text for generated ids.

The emulated engine never runs a model, so what matters is that token counts are exact and
reproducible (a prompt always costs the same tokens, on every replica) and that generated text is
readable and the same for the same token ids. Prompt text maps to its UTF-8 bytes (ids 0-255);
generated ids map to words from a fixed list, so the output of a request is a stable function of the
ids the engine drew for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Generated ids index this list (modulo its length): common English words, so streamed output
# reads like text in a terminal and in logs.
WORDS: tuple[str, ...] = tuple(
    """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no will more can
who out up about into than them some could time only new other its our may these two like then
first any do most such over after also made many before must through back years where much your
way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know
while last might us great old year off come since against go came right used take three place
system model token cache memory server request queue batch layer head vector graph node cluster
light water river stone cloud field garden window bridge market music paper story signal answer
question number method result value order level point group house city road north south east west
""".split()  # noqa: SIM905 - a word list reads better as text
)
BYTE_VOCAB = 256  # prompt ids are UTF-8 bytes


@dataclass(frozen=True)
class ChatTemplate:
    """How a model family renders a conversation into one prompt string (as its tokenizer_config does)."""

    bos: str
    turn: str  # format with role and content
    generation_prompt: str  # appended after the last message: the assistant's turn opens
    system_role: str = "system"  # Gemma has no system role: its template folds it into a user turn


TEMPLATES: dict[str, ChatTemplate] = {
    # Llama 3.x chat template (meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json).
    "llama": ChatTemplate(
        bos="<|begin_of_text|>",
        turn="<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # Mistral instruct ([INST] ... [/INST]); assistant turns close with </s>.
    "mistral": ChatTemplate(
        bos="<s>",
        turn="[INST] {content} [/INST]",
        generation_prompt="",
    ),
    # Gemma 2 (<start_of_turn>role ... <end_of_turn>), assistant role is called "model".
    "gemma": ChatTemplate(
        bos="<bos>",
        turn="<start_of_turn>{role}\n{content}<end_of_turn>\n",
        generation_prompt="<start_of_turn>model\n",
        system_role="user",
    ),
    # Qwen 2.5 (ChatML).
    "qwen": ChatTemplate(
        bos="",
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
    ),
}


def template_for(model_name: str) -> ChatTemplate:
    for family, template in TEMPLATES.items():
        if model_name.lower().startswith(family):
            return template
    return TEMPLATES["llama"]


def message_text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of an OpenAI content-part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(
        part.get("text", "")
        for part in content
        if isinstance(part, Mapping) and part.get("type") == "text"
    )


def render_chat(model_name: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """Render messages to one prompt string, ending with the assistant's generation prompt."""
    tpl = template_for(model_name)
    parts = [tpl.bos]
    for msg in messages:
        role = str(msg.get("role", "user"))
        if role == "assistant" and tpl is TEMPLATES["gemma"]:
            role = "model"
        elif role in ("system", "developer"):
            role = tpl.system_role
        content = message_text(msg.get("content"))
        if tpl is TEMPLATES["mistral"] and role == "assistant":
            parts.append(f" {content}</s>")
        else:
            parts.append(tpl.turn.format(role=role, content=content))
    parts.append(tpl.generation_prompt)
    return "".join(parts)


def encode(text: str) -> list[int]:
    """Prompt text to token ids: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode_prompt(ids: Sequence[int]) -> str:
    """Prompt ids back to text (ids outside the byte range are dropped)."""
    return bytes(i for i in ids if 0 <= i < BYTE_VOCAB).decode("utf-8", errors="replace")


def token_text(token_id: int, index: int) -> str:
    """The text of one generated token: a word, space-separated after the first."""
    word = WORDS[token_id % len(WORDS)]
    return word if index == 0 else " " + word


def detokenize(token_ids: Sequence[int]) -> str:
    return "".join(token_text(t, i) for i, t in enumerate(token_ids))
