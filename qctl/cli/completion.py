"""``qctl completion bash|zsh|fish``: print the shell completion script for ``qctl``.

The script is click's own (``click.shell_completion``), the same text click prints for
``_QCTL_COMPLETE=bash_source qctl``. It holds no command names: at every TAB it runs
``qctl`` again with ``_QCTL_COMPLETE`` set, so subcommands, options, task names and node names
always come from the installed CLI (the callbacks are in ``complete``). ``completions/`` in the
repository holds the three scripts; a test fails when they differ from this output
(regenerate them with ``scripts/gen-completions.sh``).
"""
from __future__ import annotations

import click

__all__ = ["completion", "completion_script", "SHELLS", "PROG_NAME", "COMPLETE_VAR"]

SHELLS = ("bash", "zsh", "fish")

#: The command the scripts complete. Fixed: ``python -m qctl`` and test runners pass other
#: program names, and the scripts must register for the installed ``qctl`` command.
PROG_NAME = "qctl"

#: The variable click's scripts set when they call back (click derives it from the name).
COMPLETE_VAR = f"_{PROG_NAME}_COMPLETE".replace("-", "_").upper()


def completion_script(shell: str, cli: click.Command | None = None) -> str:
    """The completion script for ``shell``, ending with a newline."""
    from click.shell_completion import get_completion_class
    if cli is None:
        from . import main as cli
    complete_class = get_completion_class(shell)
    if complete_class is None:
        raise click.BadParameter(f"unknown shell {shell!r}; choose from {', '.join(SHELLS)}")
    source = complete_class(cli, {}, PROG_NAME, COMPLETE_VAR).source()
    return source if source.endswith("\n") else source + "\n"


@click.command(epilog="""\b
Install (once per machine or user):
  bash   qctl completion bash > /etc/bash_completion.d/qctl
         (or ~/.local/share/bash-completion/completions/qctl)
  zsh    qctl completion zsh > "${fpath[1]}/_qctl"
  fish   qctl completion fish > ~/.config/fish/completions/qctl.fish
Or for the current shell only:
  eval "$(qctl completion bash)"      # zsh: eval "$(qctl completion zsh)"
  qctl completion fish | source""")
@click.argument("shell", type=click.Choice(SHELLS), metavar="SHELL")
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL: bash, zsh or fish.

    It completes sub-commands, options, the task names of -A's app (for call, control
    rate_limit and control time_limit) and node names for -d (alive on the broker, or with a
    pidfile in the current directory).
    """
    click.echo(completion_script(shell, ctx.find_root().command), nl=False)
