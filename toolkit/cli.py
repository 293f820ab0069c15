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


# Longest error line printed: a message quoting a hostile input (a 10 MB tensor name, a huge option value)
# is cut to an excerpt.
MAX_ERROR_CHARS = 400


def bounded_line(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` on one line (newlines and control characters as spaces), at most ``limit`` characters."""
    s = "".join(c if c.isprintable() else " " for c in str(message))
    return s if len(s) <= limit else s[:limit - 25] + f" ... ({len(s) - limit + 25:,} more chars)"


def main(argv=None) -> int:
    from toolkit import distributed

    def error(msg) -> int:
        click.echo(f"coalora: error: {bounded_line(msg)}", err=True)
        return 1

    try:
        cli.main(args=argv, prog_name="coalora", standalone_mode=False)
    except (CoaloraError, UnknownQuantType) as e:
        if distributed.reports(e):  # under torchrun: an error all ranks share is printed by rank 0 alone
            click.echo(f"coalora: error: {bounded_line(e)}", err=True)
        distributed.shutdown(e)
        return 1
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, EOFError):  # click turns every EOFError into Abort; coalora never prompts
            return error(f"unexpected end of a file ({e.__cause__ or 'EOF'})")
        click.echo("coalora: aborted", err=True)
        return 130
    except click.ClickException as e:
        e.message = bounded_line(e.message)
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("coalora: interrupted; no partial output was kept", err=True)
        return 130
    except MemoryError:
        return error("out of memory")
    except RecursionError:
        return error("input nested too deeply")
    except OSError as e:
        return error(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
