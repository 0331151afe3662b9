"""Old path of `aepo.integrations.verl.main`: `python -m aepo.integrations.verl_main` runs it."""
from aepo.integrations._alias import alias

_main = alias(globals(), "aepo.integrations.verl.main")

if __name__ == "__main__":
    _main.main()
