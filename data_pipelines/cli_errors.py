"""The one error path of every command line tool (micle-data and the micle_tf CLIs).

A *user error* ends the command with one line on stderr,

    micle-<cmd>: error: <what went wrong, which file or flag, what to do>

and exit status 2 (as argparse does); any other exception is a bug and keeps its traceback.
With absl's `-v 1` (`--verbosity=1`) a user error shows its traceback too.

A user error is, precisely:
  - a command-line mistake: `absl.app.UsageError` (a missing or contradictory flag, raised by
    the CLI) or `absl.flags.Error` (a flag value that does not parse or is not one of its
    choices, raised while parsing);
  - a path the user named that is not what it should be: FileNotFoundError, FileExistsError,
    NotADirectoryError, IsADirectoryError, raised anywhere (a missing --data_dir or
    --model_dir, a split without shards, an existing --export_dir, ...);
  - a ValueError or OSError that first-party code raised on purpose: the innermost frame of
    its traceback is a `raise` statement in one of the `packages` given to `run_main`
    (data_pipelines, micle_tf). These are the library's checks of its inputs (an image size
    the pretrained stem cannot take, label names that differ from the model's, a split that
    shares cases with training, a damaged shard), whose messages name the file and the fix.
    A ValueError raised inside TensorFlow, Keras or numpy, or by a Python operation in our
    code (an unpacking, a conversion), is a bug: traceback.
Library code therefore reports a user's mistake by raising ValueError (or one of the path
errors above) with a message that says what to do; it never prints or exits itself.
"""
import linecache
import os
import sys

from absl import app, flags

EXIT_USER_ERROR = 2
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def _package_dirs(packages):
    dirs = []
    for name in packages:
        module = sys.modules.get(name) or __import__(name)
        dirs.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(dirs)


def raised_on_purpose(error, packages):
    """True when the innermost traceback frame of `error` is a `raise` in `packages`' code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(_package_dirs(packages)):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(error, packages=("data_pipelines",)):
    """The rule of the module docstring."""
    if isinstance(error, (app.UsageError, flags.Error) + PATH_ERRORS):
        return True
    return isinstance(error, (ValueError, OSError)) and raised_on_purpose(error, packages)


def exit_with_user_error(name, error):
    """Prints the error (its first line last, as `name: error: ...`) and exits with status 2.
    Further lines of a long message (e.g. the variables a checkpoint lacks) come first."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    first, rest = lines[0], lines[1:]
    if isinstance(error, (app.UsageError, flags.Error)):
        first += f" (see {name} --help)"
    for line in rest:
        print(line, file=sys.stderr)
    print(f"{name}: error: {first}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_main(main, name, packages=("data_pipelines",)):
    """`absl.app.run(main)` with the error path of the module docstring: flag parsing errors
    and user errors raised by `main` end in one line and exit status 2."""
    tracebacks = []  # set once the flags are parsed (main may reset the logging verbosity)

    def parse(argv):
        try:
            argv = flags.FLAGS(argv)
        except flags.Error as e:
            exit_with_user_error(name, e)
        verbosity = flags.FLAGS["verbosity"] if "verbosity" in flags.FLAGS else None
        tracebacks.append(verbosity is not None and verbosity.present and verbosity.value >= 1)
        return argv

    def guarded(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
            if any(tracebacks) or not is_user_error(e, packages):
                raise
            exit_with_user_error(name, e)

    app.run(guarded, flags_parser=parse)
