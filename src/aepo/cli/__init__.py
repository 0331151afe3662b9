"""The `aepo` command line: the only code that imports typer.

    main.py    demo, train, sft, eval, rollout, audit, compare, data to-verl
    model.py   aepo model init | info | import-smollm2
    tools.py   aepo tools search | python | calc
    world.py   aepo world build
    common.py  failing, warning and checking options, shared by all of them
"""
from aepo.cli.main import app

__all__ = ["app"]
