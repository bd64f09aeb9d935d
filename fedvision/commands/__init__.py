"""The subcommands of ``fedvision``: one module per command, each with its ``register(sub)``.

A module adds its parser(s) to the ``add_subparsers()`` action it is given and sets the handler
(``set_defaults(handler=...)``); ``fedvision.cli`` only lists the modules and dispatches. The
modules import nothing heavy at the top (torch, flwr, Hydra, matplotlib): their handlers import
the layer they call, so that ``fedvision --help`` and argument errors stay instant.
"""
