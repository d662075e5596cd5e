"""Run folders: runs/<name>/ with config.json (every option as used), metrics.jsonl (one JSON
record per logged step and per evaluation) and the checkpoints. Files are written whole or not
at all (a temporary file, then a rename), and a new run never takes an old run's folder.
"""
import atexit
import inspect
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import fire


def write_atomic(path, text):
    """Writes text to path through a temporary file and a rename: never half a file."""
    tmp = Path(f'{path}.tmp')
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f'cannot write {path}: {e.strerror or e}') from e


def unique_name(name, taken):
    """name, with -2, -3, ... appended until it is not in taken (lower case, for
    case-insensitive filesystems); the result is added to taken."""
    unique, k = name, 1
    while unique.lower() in taken:
        k += 1
        unique = f'{name}-{k}'
    taken.add(unique.lower())
    return unique


def new_run_dir(out_dir, run_name, dataset, rank=0):
    """The folder of a new run: run_name under out_dir (refused if it exists: a new run never
    overwrites an old one), or <dataset>-<time>, made unique. Only rank 0 checks: the others
    find the folder rank 0 made."""
    out_dir = Path(out_dir)
    if run_name is not None:
        run_dir = out_dir / run_name
        if run_dir.exists() and rank == 0:
            raise ValueError(f'--run-name={run_name}: {run_dir} already exists; continue that '
                             f'run with --resume={run_dir} or choose another --run-name')
        return run_dir
    taken = {path.name.lower() for path in out_dir.iterdir()} if out_dir.is_dir() else set()
    return out_dir / unique_name(f'{dataset}-{time.strftime("%Y%m%d-%H%M%S")}', taken)


def save_config(options, run_dir):
    """Writes the dict options to run_dir/config.json. A new run folder appears whole, with its
    config.json, or not at all (it is made under a temporary name and renamed), so --resume
    can rely on it."""
    text = json.dumps(options, indent=2)
    if run_dir.is_dir():
        return write_atomic(run_dir / 'config.json', text)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.new-run-', dir=run_dir.parent))  # any legal name fits
    (tmp / 'config.json').write_text(text)
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(run_dir)


class RunLog:
    """The run folder's JSON-lines metrics log (rank 0 only).

    On resume, records after the checkpoint's step are dropped: the steps are run again and
    would otherwise be logged twice.
    """

    def __init__(self, path, enabled, resume_step=None):
        self.path, self.enabled = Path(path), enabled
        if enabled and resume_step is not None and self.path.is_file():
            lines = [line for line in self.path.read_text().splitlines()
                     if _record_step(line) <= resume_step]
            write_atomic(self.path, ''.join(line + '\n' for line in lines))

    def write(self, **record):
        if self.enabled:
            # NaN as null: strict JSON (the AP of a class absent from a split is undefined)
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}
            with open(self.path, 'a') as f:
                f.write(json.dumps(record, allow_nan=False) + '\n')


def _record_step(line):
    try:
        return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):  # a line cut by a kill: drop it
        return math.inf


def one_line(error):
    """The line of an error's message that says what happened: the first, or for a DataLoader
    worker's error (the worker's traceback) the last, which is the original message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    worker = 'Traceback (most recent call last)' in str(error)  # a DataLoader worker's error
    return lines[-1 if worker else 0] if lines else type(error).__name__


WARNINGS_SHOWN = 3  # from one place; the rest are counted
_warnings_seen = {}  # (filename, lineno) -> [how many so far, the first one's message]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    seen = _warnings_seen.setdefault((filename, lineno), [0, str(message)])
    seen[0] += 1
    if seen[0] <= WARNINGS_SHOWN:
        print(f'warning: {message}', file=sys.stderr)
    elif seen[0] == WARNINGS_SHOWN + 1:  # the first not shown: count at exit
        atexit.register(lambda: print(f'warning: {seen[0] - WARNINGS_SHOWN} more like '
                                      f'"{seen[1][:80]}" not shown', file=sys.stderr))


def check_flags(target, args, command):
    """Refuses a --flag that the function target (or in a dict of verbs, the verb args[0]) does
    not take, before any work (fire would run the function first and complain after); a
    function taking **options checks them itself."""
    if isinstance(target, dict):
        return check_flags(target[args[0]], args[1:], f'{command} {args[0]}')
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for arg in args:
        name = arg[2:].split('=')[0].replace('-', '_')
        negated = name.startswith('no') and name[2:] in parameters  # fire's --noflag
        if arg.startswith('--') and arg != '--help' and name not in parameters and not negated:
            raise ValueError(f'--{name.replace("_", "-")} is not an option of {command}; '
                             f'{command} --help lists them')


def run_command(target, argv=None, errors=(ValueError, OSError)):
    """fire.Fire(target) (a function, or a dict of verbs) on argv (default: the command line)
    with the project's one error path: options are checked before any work, and an expected
    error ends the program with one line 'error: ...' (exit status 1), or with --debug its
    traceback. Warnings are one line each, 'warning: ...'; after 3 from one place, the rest
    are counted and their number printed at the end."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = '--debug' in argv
    argv = [arg for arg in argv if arg != '--debug']
    warnings.showwarning = _show_warning
    try:
        check_flags(target, argv, f'python {sys.argv[0]}')
        return fire.Fire(target, command=argv)
    except errors as e:
        if debug:
            raise
        sys.exit(f'error: {one_line(e)}')
