"""Old path of `aepo.integrations.verl.trainer` (verl command lines use it): the same module."""
from aepo.integrations._alias import alias

alias(globals(), "aepo.integrations.verl.trainer")
