"""What every command line tool here does with bad input and with Ctrl-C, in one place.

Bad input (a flag out of range, a missing or broken file, a launch that cannot work) is one line
`error: what was wrong; what to do` on stderr and exit code 2, never a traceback. Ctrl-C exits 130 (the
shell's code for SIGINT) after the tool has cleaned up: files are written under a temporary name and
renamed only when complete (checkpoint.atomic_output), so an interrupted write leaves nothing behind.
This module imports nothing of the project: every layer may use it.
"""
import argparse
import copy
import errno
import sys

INTERRUPTED_EXIT_CODE = 130


class UsageError(Exception):
    """Bad input: reported as one line `error: ...` with exit code 2. Each layer's own kind of bad input
    (CheckpointError, ConversionError, DistributedError, ...) is a subclass."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's help ends with its default: "(default: X)", "(default: off)"
    for a switch, "(default: none)" for None, "(required)" for a required option. A help that already says its
    default (or that it is required) is left as it is."""

    def _format_action(self, action):
        if action.option_strings and action.help is not argparse.SUPPRESS and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse shows no help line without a help: give every option one
            action.help = with_default(action)
        return super()._format_action(action)


def with_default(action) -> str:
    """action's help with its default appended (help strings are %-formatted by argparse: % is escaped as %%)."""
    text = action.help or ""
    if "default" in text.lower() or "(required" in text:
        return text
    if action.required:
        said = "(required)"
    elif action.nargs == 0 and isinstance(action.default, bool):  # store_true / store_false
        said = "(default: on)" if action.default else "(default: off)"
    elif action.default is None or action.default == "":
        said = "(default: none)"
    else:
        said = "(default: %(default)s)"
    return f"{text} {said}" if text else said


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line (argparse prints the whole usage block first), the
    module's docstring is shown as written, and each option's help says its default (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run(command, argv=None, cleanup=None):
    """Call command(argv) as a CLI's main: bad input -> one line, exit 2; Ctrl-C -> exit 130."""
    try:
        command(argv)
    except UsageError as error:
        fail(str(error))
    except OSError as error:  # what the file system refused that no check before could know (a full disk, permissions)
        what = "no space left on the device" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else error.strerror
        fail(f"{what}{f' writing {error.filename}' if error.filename else ''}; free some space or choose another folder")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    finally:
        if cleanup is not None:
            cleanup()


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
