"""Errors a user reads, not tracebacks: InputError names a bad file and its problem; scripts end in run_main.

Every script ends with `if __name__ == "__main__": run_main(main)`. Bad user input (a missing, empty,
truncated or non-media file, a corrupt or truncated checkpoint, a malformed config.json or manifest
row) raises InputError("<path>: <problem>"); run_main prints it as one line `error: <message>` on
stderr and exits with status 2 (argparse's status for a bad command line). Every other exception is
a bug and keeps its traceback.
"""
import sys


class InputError(ValueError):
    """Bad user input. The message names the file (path, or path:line) and the problem."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


def run_main(main):
    """main() with InputError turned into one line on stderr and exit status 2."""
    try:
        return main()
    except InputError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        sys.exit(2)
