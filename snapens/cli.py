"""Around every Hydra entry point: a run dir that cannot be written, Hydra's own errors (a misspelt key, a value of
the wrong type, an unknown option) and a stop signal during start-up, each said in one line with the fix."""

import difflib
import os
import signal
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

from hydra.errors import HydraException, MissingConfigException, OverrideParseException

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): try again later, e.g. requeue the job


def run(main) -> None:
    """Call a @hydra.main function as the command line's entry point."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us instead of being printed in many lines
    signal.signal(signal.SIGUSR1, signal.default_int_handler)  # until training takes over: like Ctrl-C, not death
    try:
        check_writable(sys.argv[1:])
        main()
    except KeyboardInterrupt:  # SIGINT or SIGUSR1 before training began: nothing was written
        fail("stopped during start-up, before training began; run the same command again", EXIT_INTERRUPTED)
    except HydraException as e:
        fail(hydra_error(e), 2)


def fail(message: str, status: int) -> None:
    print(f"snapens: error: {message}" if status == 2 else f"snapens: {message}", file=sys.stderr)
    sys.exit(status)


def check_writable(args: list[str]) -> None:
    """The run dir (hydra.run.dir=, hydra.sweep.dir= with -m, or outputs/ here by default) must be writable: checked
    before Hydra makes it and opens its log there, which would fail with a traceback."""
    key = "hydra.sweep.dir=" if {"-m", "--multirun"} & set(args) else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in args if a.startswith(key)]
    target = Path(given[-1] if given else "outputs").absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        fail(f"cannot write {target}: {existing} is not writable; pass a writable {key}DIR", 2)


def hydra_error(error: HydraException) -> str:
    """One line for an error Hydra raises while composing the config."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return f"{group}={option} is not an option; choose one of: {', '.join(error.options)}"
    cause = error.__cause__
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if key and "not in" in str(cause) and is_dataclass(schema):  # a key the group's schema does not declare
        prefix, _, name = key.rpartition(".")
        near = difflib.get_close_matches(name, [f.name for f in fields(schema)], n=1)
        return f"{key} is not a key of {prefix or 'the config'}" + (f"; did you mean {prefix}.{near[0]}?" if near
                                                                    else "")
    if key:
        return f"{key}: {str(cause).splitlines()[0]}"
    if isinstance(error, OverrideParseException):  # the grammar's complaint and where the grammar is explained
        return "cannot parse an override: " + " ".join(line.strip() for line in str(error).splitlines())
    return str(error).splitlines()[0]
