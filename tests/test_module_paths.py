"""Module paths users type keep working after the packages moved: verl command lines name
`aepo.integrations.verl_*` (now `aepo.integrations.verl/`), and the sandbox's child still runs
as a script by path from `aepo/tools/sandbox/`."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

OLD_VERL_PATHS = {
    "aepo.integrations.verl_agent_loop": "aepo.integrations.verl.agent_loop",
    "aepo.integrations.verl_main": "aepo.integrations.verl.main",
    "aepo.integrations.verl_trainer": "aepo.integrations.verl.trainer",
    "aepo.integrations.verl_task": "aepo.integrations.verl.task",
    "aepo.integrations.verl_lora": "aepo.integrations.verl.lora",
}


@pytest.mark.parametrize("old, new", sorted(OLD_VERL_PATHS.items()))
def test_old_verl_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_verl_package_keeps_the_old_modules_public_names():
    import aepo.integrations.verl as aepo_verl

    for name in ("register", "ADV_ESTIMATOR_NAMES", "POLICY_LOSS_NAMES"):
        assert hasattr(aepo_verl, name), name
    assert callable(aepo_verl.register)
    # the dotted attribute paths of verl's config: the Ray setup hook and the agent loop class
    from aepo.integrations.verl_agent_loop import AepoTreeAgentLoop, register  # noqa: F401
    from aepo.integrations.verl_main import SETUP_HOOKS
    from aepo.integrations.verl_trainer import register as trainer_register

    assert "aepo.integrations.verl_trainer.register" in SETUP_HOOKS
    assert "aepo.integrations.verl.trainer.register" in SETUP_HOOKS
    assert callable(trainer_register)


@pytest.mark.parametrize("path", ["integrations/verl_task.py", "integrations/verl/task.py"])
def test_the_reward_file_loads_by_path_as_verl_loads_it(path):
    """verl's custom_reward_function.path: a file executed as a fresh module, then getattr."""
    spec = importlib.util.spec_from_file_location("custom_module", SRC / "aepo" / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from aepo.integrations.verl.task import compute_score

    assert callable(module.compute_score) and module.compute_score.__qualname__ == "compute_score"
    if path == "integrations/verl_task.py":  # the alias file hands over the module's own function
        assert module.compute_score is compute_score


def test_python_dash_m_of_the_old_main_runs_the_new_main():
    """`python -m aepo.integrations.verl_main` reaches verl.main's main(), which here stops at its
    first verl-side import (hydra is not installed outside the verl environment)."""
    pytest.importorskip("aepo.integrations.verl.main")
    has_hydra = importlib.util.find_spec("hydra") is not None
    if has_hydra:
        pytest.skip("hydra installed: tests/test_verl_main.py runs the real command")
    r = subprocess.run([sys.executable, "-m", "aepo.integrations.verl_main", "--help"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode != 0
    assert "aepo/integrations/verl/main.py" in r.stderr and "in main" in r.stderr, r.stderr[-2000:]
    assert "No module named 'hydra'" in r.stderr


def test_the_sandbox_child_runs_as_a_script_from_its_folder():
    """The parent starts `python -I -S <sandbox>/child.py`: no package, no sys.path entry, so
    it loads its sibling seccomp.py by path; a real run proves the walls were built."""
    from aepo.tools.sandbox import PythonSandbox, launch

    assert launch._CHILD == SRC / "aepo" / "tools" / "sandbox" / "child.py"
    assert launch._CHILD.is_file() and launch._CELL.is_file()
    result = PythonSandbox(timeout=20).run("import os\nprint(6 * 7, os.getpid())")
    assert result.ok, result
    answer, pid = result.stdout.split()
    assert answer == "42" and int(pid) > 1
    # the child script on its own, with settings it cannot parse: it fails in its own code, not on imports
    r = subprocess.run([sys.executable, "-I", "-S", str(launch._CHILD), "{not json"], capture_output=True,
                       text=True, timeout=60, check=False, cwd="/")
    assert r.returncode != 0 and "JSONDecodeError" in r.stderr and "ModuleNotFoundError" not in r.stderr


def test_import_aepo_is_cheap():
    """`import aepo` loads no submodule and no torch; the API names load on first use."""
    code = ("import sys, aepo\n"
            "print(sorted(m for m in sys.modules if m.startswith('aepo.') or m.split('.')[0] in "
            "('torch', 'transformers', 'numpy')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.parametrize("name, home", [
    ("Config", "aepo.config.Config"), ("load_config", "aepo.config.load_config"),
    ("RLTrainer", "aepo.train.rl.RLTrainer"), ("evaluate", "aepo.eval.runner.evaluate_tasks"),
    ("register_policy_loss", "aepo.algos.losses.register_policy_loss"),
    ("register_advantage", "aepo.algos.advantages.register_advantage"),
    ("register_tool", "aepo.tools.registry.register_tool"),
    ("register_strategy", "aepo.rollout.strategies.register_strategy"),
    ("register_format", "aepo.formats.register_format"), ("Registry", "aepo.registry.Registry"),
])
def test_the_top_level_api_is_the_modules_own_objects(name, home):
    import aepo

    module, attr = home.rsplit(".", 1)
    assert getattr(aepo, name) is getattr(importlib.import_module(module), attr)
    assert name in dir(aepo) and name in aepo.__all__


def test_an_unknown_top_level_name_lists_the_api():
    import aepo

    with pytest.raises(AttributeError, match="no attribute 'Trainer'.*RLTrainer"):
        aepo.Trainer  # noqa: B018
    from aepo import load_config

    cfg = load_config(None, ["algo=grpo"])
    assert cfg.actor.adv_estimator == "grpo"
