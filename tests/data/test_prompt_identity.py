"""One prompt builder: a question becomes the same token ids in sft, train, eval, rollout and
`aepo data to-verl` (whose chat messages verl's agent loop renders with the same template)."""
from __future__ import annotations

import pytest

from aepo.config import load_config
from aepo.data.datasets import TaskRow
from aepo.data.prompting import encode_prompt, run_prompt
from aepo.integrations.verl_task import verl_rows
from aepo.models.tokenizer import build_tokenizer
from aepo.train.sft import encode_demonstration

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
QUESTION = "  In which country was the founder of Selto Bank born? "


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(params=[False, True], ids=["plain", "chat"])
def cfg(request):
    # tools and a tool-call budget that differ from the defaults, so a caller that drops them shows
    return load_config(None, [f"model.chat_template={str(request.param).lower()}", "tools.enabled=[search, calc]",
                              "rollout.max_tool_calls=4"])


def _trainer_ids(cfg, tok) -> list[int]:
    from aepo.train.rl import RLTrainer

    trainer = RLTrainer.__new__(RLTrainer)  # only the prompt builder: no model, no optimizer
    trainer.cfg, trainer.tokenizer, trainer._prompt_cache = cfg, tok, {}
    return trainer._prompt_ids(TaskRow("q0", QUESTION, ["x"], "hotpotqa"))


def _eval_ids(cfg, tok, monkeypatch) -> list[int]:
    from aepo.eval import runner as eval_runner

    seen = []

    def capture(strategy, prompts, *args, **kwargs):
        seen.extend(ids for _, ids in prompts)
        return [], {}

    class Backend:
        def sampler(self, seed):
            return None

    monkeypatch.setattr(eval_runner, "rollout", capture)
    eval_runner.evaluate_tasks(None, tok, [TaskRow("q0", QUESTION, ["x"], "hotpotqa")], lambda calls: [],
                               rollout_cfg=cfg.rollout, chat_template=cfg.model.chat_template,
                               tools=cfg.tools.enabled, backend=Backend(), progress=False)
    return seen[0]


def _sft_ids(cfg, tok) -> list[int]:
    ex = encode_demonstration(QUESTION, [("model", "<answer>x</answer>")], tok, chat_template=cfg.model.chat_template,
                              tools=cfg.tools.enabled, max_tool_calls=cfg.rollout.max_tool_calls)
    answer = tok.encode("<answer>x</answer>", add_special_tokens=False)
    return ex.input_ids[: len(ex.input_ids) - len(answer)]


def test_one_question_gives_the_same_prompt_ids_everywhere(cfg, tok, monkeypatch):
    want = run_prompt(QUESTION, tok, cfg)
    assert _trainer_ids(cfg, tok) == want
    assert _eval_ids(cfg, tok, monkeypatch) == want
    assert _sft_ids(cfg, tok) == want
    # `aepo rollout` builds it from the model's settings the same way
    assert encode_prompt(QUESTION, tok, chat_template=cfg.model.chat_template, tools=cfg.tools.enabled,
                         max_tool_calls=cfg.rollout.max_tool_calls) == want
    if cfg.model.chat_template:  # verl renders to-verl's messages with the model's own template
        [row] = verl_rows([TaskRow("q0", QUESTION, ["x"], "hotpotqa")], tools=cfg.tools.enabled,
                          max_tool_calls=cfg.rollout.max_tool_calls)
        rendered = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "input_ids") else rendered
        assert list(rendered) == want
        assert "at most 4 times" in tok.decode(want) and "python" not in tok.decode(want).split("<|user|>")[0]


def test_a_caller_that_drops_the_runs_tools_is_caught(tok):
    """The check above can fail: the defaults (every tool, six calls) give other ids."""
    cfg = load_config(None, ["model.chat_template=true", "tools.enabled=[search, calc]", "rollout.max_tool_calls=4"])
    assert encode_prompt(QUESTION, tok, chat_template=True) != run_prompt(QUESTION, tok, cfg)
    assert encode_prompt(QUESTION, tok, chat_template=True, tools=cfg.tools.enabled) != run_prompt(QUESTION, tok, cfg)
