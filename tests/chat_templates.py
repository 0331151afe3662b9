"""Chat tokenizers built offline for format tests: aepo's byte-level tokenizer with ChatML tokens
and one of three templates written here, after the ones pretrained models ship:

- `QWEN`: Qwen2.5-style, renders `tools=` as JSON schemas in the system turn and `tool` messages as
  `<tool_response>` blocks in a user turn (append-only).
- `CHATML`: SmolLM2-style ChatML without tools support (`tools=` is ignored; `tool` is a role).
- `QWEN3`: like QWEN, but earlier assistant turns lose their `<think>` block (history-rewriting).
"""
from __future__ import annotations

from typing import Any

QWEN = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or m.role == 'assistant' %}\n<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>"
    "{%- elif m.role == 'tool' %}\n<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}\n<|im_start|>assistant\n{%- endif %}"
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN3 = QWEN.replace(
    "{%- if m.role == 'user' or m.role == 'assistant' %}\n<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>",
    "{%- if m.role == 'user' %}\n<|im_start|>user\n{{ m.content }}<|im_end|>"
    "{%- elif m.role == 'assistant' %}\n<|im_start|>assistant\n"
    "{{ m.content.split('</think>')[-1].lstrip('\\n') if not loop.last else m.content }}<|im_end|>",
)


def chat_tokenizer(template: str) -> Any:
    """aepo's generic byte-level tokenizer with `<|im_start|>` / `<|im_end|>` (the end of turn) and `template`."""
    from aepo.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = template
    return tok
