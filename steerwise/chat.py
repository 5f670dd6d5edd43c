"""Chat-template formatting for instruct models (``fit(..., chat=...)``, ``generate(..., chat=...)``,
``--chat user|assistant`` on the command line).

An instruct model sees text inside its chat template, so steering fitted on bare text can miss
where the model actually works. With a role, each text is rendered with the tokenizer's own
template before its activations are read, and prompts are rendered the same way at generation:

* ``user``: the text is a user message, followed by the template's generation prompt (the
  assistant header), i.e. the model's state just before it answers. For ``generate`` the model
  then writes the assistant's reply.
* ``assistant``: the text is the assistant's reply to an empty user message. For ``fit`` the turn
  is complete (with the template's end-of-turn tokens); for ``generate`` the prompt is the start of
  the assistant's reply and the model continues it (``continue_final_message``).

Templates that write the BOS token themselves would get a second one from the tokenizer (which
adds special tokens when encoding), so a leading BOS is removed from the rendered text when the
tokenizer adds it anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

CHAT_ROLES = ("user", "assistant")


def check_chat(tokenizer, role: str) -> None:
    """Raise ``ValueError`` for an unknown role or a tokenizer without a chat template."""
    if role not in CHAT_ROLES:
        raise ValueError(f"unknown chat role {role!r}; choose one of {', '.join(CHAT_ROLES)}")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer of {name!r} has no chat template (tokenizer.chat_template is unset): "
            f"chat formatting needs a chat/instruct model's tokenizer (or assign a Jinja template "
            f"to tokenizer.chat_template)"
        )


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def format_chat(
    tokenizer, texts: Sequence[str], role: str, *, for_generation: bool = False
) -> list[str]:
    """``texts`` rendered with the tokenizer's chat template as ``role`` messages (see the module
    docstring); ``for_generation`` renders prompts for ``generate`` rather than fitting texts."""
    check_chat(tokenizer, role)
    strip_bos = tokenizer.bos_token if _adds_bos(tokenizer) else None
    out = []
    for text in texts:
        if role == "user":
            messages = [{"role": "user", "content": text}]
            kw = {"add_generation_prompt": True}
        else:
            messages = [{"role": "user", "content": ""}, {"role": "assistant", "content": text}]
            kw = {"continue_final_message": True} if for_generation else {}
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
        if not isinstance(rendered, str):
            raise TypeError(f"the chat template rendered {type(rendered).__name__}, not text")
        if strip_bos and rendered.startswith(strip_bos):
            rendered = rendered[len(strip_bos):]
        out.append(rendered)
    return out
