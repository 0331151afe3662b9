"""The `aepo` command line: the only code that imports typer.

    main.py      the app: demo, compare, and the commands of the modules below, in --help order
    train.py     aepo train | sft
    evaluate.py  aepo eval | rollout | audit
    settings.py  checks of a command's model, data and settings, shared by the commands
    data.py      aepo data to-verl
    analyze.py   aepo analyze branching
    model.py     aepo model init | info | import-smollm2
    tools.py     aepo tools search | python | calc
    world.py     aepo world build
    common.py    failing, warning and checking options, shared by all of them
"""
from aepo.cli.main import app

__all__ = ["app"]
