"""The ``innerloop`` command: ``python -m innerloop``, and the console script (``innerloop.__main__:main``).

:func:`innerloop.cli.main` ends a Ctrl-C in one line with the shell's status for it, 130. A Ctrl-C that
lands before it runs, while ``innerloop.cli`` is being imported, is ended here the same way, not with a
traceback of the import. (One that lands in ``import innerloop`` itself, which Python runs before this
module, is not: the package imports torch.)
"""

import sys

try:
    from innerloop.cli import main
except KeyboardInterrupt:
    _command = next((word for word in sys.argv[1:] if not word.startswith("-")), None)
    print(f"\ninnerloop{f' {_command}' if _command else ''}: interrupted (Ctrl-C)", file=sys.stderr)
    sys.exit(128 + 2)  # the shell's status for SIGINT, as main() returns

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
