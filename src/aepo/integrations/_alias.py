"""Old dotted paths kept as aliases of the modules that moved into `aepo.integrations.verl/`.

verl command lines name aepo's modules (`python -m aepo.integrations.verl_main`, Ray's
`worker_process_setup_hook=aepo.integrations.verl_trainer.register`, the agent loop's
`_target_: aepo.integrations.verl_agent_loop.AepoTreeAgentLoop`, the reward file
`aepo.integrations.verl_task`'s path); each old module makes its name the new module itself.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


def alias(namespace: dict[str, Any], new: str) -> ModuleType:
    """Make the old module whose globals are `namespace` the module `new`: it gets the new
    module's names (for a file loaded by path, as verl loads a reward function), and when it is
    imported by its dotted name, `sys.modules` maps that name to the new module itself (so
    patches and class identity are shared)."""
    module = importlib.import_module(new)
    namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    name = namespace["__name__"]
    if name != "__main__" and getattr(sys.modules.get(name), "__dict__", None) is namespace:
        sys.modules[name] = module
    return module
