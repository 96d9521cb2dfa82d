"""Chat messages to a prompt: the model's own chat template, or moedeploy's plain one for models without.

The plain template writes each message as a speaker's line in a play, the form the demo model knows:

    SYSTEM.
    You are terse.

    USER.
    Who goes there?

    ASSISTANT.
    <the model continues here>
"""

from __future__ import annotations

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}.\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT.\n{% endif %}"
)


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` ([{role, content}]) followed by the assistant's turn."""
    template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids
