"""`python -m aepo.integrations.verl_main`: aepo's checks run before verl starts Ray, one line and
exit 2 on a wrong setting, and a node that cannot hold the Python sandbox is refused with the fix.

Run in the verl venv: AEPO_VENV=.venv-verl AEPO_EXTRAS=verl python3 quickstart.py test tests/test_verl_main.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import ROOT

pytest.importorskip("verl.trainer.main_ppo", reason="verl cannot be imported (pip install aepo[verl])")

from hydra import compose, initialize_config_dir

from aepo.errors import ConfigError
from aepo.integrations.verl_main import preflight

EXAMPLES = ROOT / "examples" / "verl"
SMOKE = ["--config-path", str(EXAMPLES), "--config-name", "smoke_1gpu"]


def example(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(EXAMPLES), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_example_configs_pass():
    preflight(example("smoke_1gpu"))
    preflight(example("aepo_qwen3_8gpu", "~actor_rollout_ref.rollout.custom.aepo.tool_config.search_cache",
                      "actor_rollout_ref.rollout.custom.aepo.tool_config.enabled=[calc,python]"))


@pytest.mark.parametrize("overrides, message", [
    (["+actor_rollout_ref.rollout.custom.aepo.bogus=1"], "unknown key 'bogus'"),
    (["+actor_rollout_ref.rollout.custom.aepo.temperature=0.5"], "actor_rollout_ref.rollout.temperature"),
    (["trainer.v1.trainer_mode=sync"], "trainer.v1.trainer_mode=aepo_sync"),
    (["trainer.v1.trainer_mode=aepo_separate_async"], "async modes"),
    (["ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=null"], "setup hook"),
    (["+algorithm.aepo_entropy_alpha=0.3"], "custom.aepo.entropy_alpha"),
    (["+actor_rollout_ref.rollout.custom.aepo.min_tree_fraction=2"], "min_tree_fraction"),
])
def test_wrong_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preflight(example("smoke_1gpu", *overrides))


def run_main(*args: str, wrap: list[str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The launcher in `cwd` (hydra writes its outputs/ folder there)."""
    cmd = [*(wrap or []), sys.executable, "-m", "aepo.integrations.verl_main", *SMOKE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False, cwd=cwd)


def aepo_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("aepo:")]


def test_launcher_refuses_before_ray_starts(tmp_path):
    done = run_main("actor_rollout_ref.rollout.custom.aepo.max_tool_calls=-1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(aepo_lines(done.stderr)) == 1 and "max_tool_calls" in aepo_lines(done.stderr)[0]
    assert "ray init" not in done.stdout and "Started a local Ray instance" not in done.stderr


def _can_fake_a_node_without_user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-U", "-r", "sh", "-c", "echo 0 > /proc/sys/user/max_user_namespaces"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_fake_a_node_without_user_namespaces(), reason="cannot create a user namespace here")
def test_node_without_user_namespaces_is_refused_with_the_fix(tmp_path):
    """A node where no user namespace can be created (as in Docker's default profile): inside a
    user namespace whose user.max_user_namespaces is 0, the launcher refuses the python tool with
    one line naming the sysctl, the container options and the explicit weaker mode."""
    wrap = ["unshare", "-U", "-r", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
    done = run_main("actor_rollout_ref.rollout.custom.aepo.tool_config.enabled=[calc,python]", wrap=wrap,
                    cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = aepo_lines(done.stderr)
    for fix in ("user.max_user_namespaces", "seccomp=unconfined", "python_isolation=limits-only", "tool_config"):
        assert fix in line, line
    # the same node with the weaker mode named explicitly passes the check (and would start verl)
    script = ("from hydra import compose, initialize_config_dir\n"
              "from aepo.integrations.verl_main import preflight\n"
              f"with initialize_config_dir(config_dir={str(EXAMPLES)!r}, version_base=None):\n"
              "    cfg = compose(config_name='smoke_1gpu', overrides=["
              "'actor_rollout_ref.rollout.custom.aepo.tool_config.enabled=[calc,python]', "
              "'+actor_rollout_ref.rollout.custom.aepo.tool_config.python_isolation=limits-only'])\n"
              "preflight(cfg); print('passed')")
    ok = subprocess.run([*wrap, sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                        check=False, cwd=tmp_path)
    assert ok.returncode == 0 and "passed" in ok.stdout, ok.stderr[-2000:]
