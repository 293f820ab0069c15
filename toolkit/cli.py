"""`coalora`: the command-line entry point. Each command lives in a ``toolkit/cmd_*.py`` module."""
from __future__ import annotations

import importlib
import sys

import click

from converters.quant_types import UnknownQuantType
from converters.errors import CoaloraError

# Modules that register commands on the group, in help order.
COMMAND_MODULES = ("toolkit.cmd_model", "toolkit.cmd_imatrix", "toolkit.cmd_train", "toolkit.cmd_search", "toolkit.cmd_deploy",
                   "toolkit.cmd_demo")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="coalora")
def cli():
    """CoA-LoRA for llama.cpp: one training run, a LoRA adapter for every quantization and device."""


for _mod in COMMAND_MODULES:
    try:
        importlib.import_module(_mod).register(cli)
    except ModuleNotFoundError as e:  # a command module not written yet
        if e.name != _mod:
            raise


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="coalora", standalone_mode=False)
    except (CoaloraError, UnknownQuantType) as e:
        click.echo(f"coalora: error: {e}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("coalora: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("coalora: interrupted; no partial output was kept", err=True)
        return 130
    except MemoryError:
        click.echo("coalora: error: out of memory", err=True)
        return 1
    except OSError as e:
        click.echo(f"coalora: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
