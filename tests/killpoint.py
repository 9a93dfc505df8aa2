"""Run fedllm's real apps in this process and SIGKILL it at a chosen point (for
`tests/integration/test_sigkill_resume.py`).

    python -m tests.killpoint POINT CALL SITES OVERRIDES_JSON
    python -m tests.killpoint serve      (the same, one JSON request per line, each forked)

The named function is wrapped so that its CALL-th call in this process (counted from 1)
kills the process with SIGKILL: no `finally`, no atexit, no flush, as when a machine dies.
`POINT = none` runs to the end. Only this test driver wraps anything; the library has no
hook for it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner: Any, name: str, call: int, *, after: bool = False, when: Any = None) -> None:
    """Kill on the `call`-th call of `owner.name` for which `when(*args)` holds: before the
    call runs (mid-operation for the caller), or with `after` once it has returned."""
    original: Callable[..., Any] = getattr(owner, name)
    seen = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        if when is None or when(*args, **kwargs):
            seen += 1
            if seen == call and not after:
                _die()
            if seen == call:
                result = original(*args, **kwargs)
                _die()
                return result
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def arm(point: str, call: int, run_dir: str) -> None:
    """Wrap what `point` names (each import is the module whose attribute the caller reads)."""
    if point == "none":
        return
    if point == "sites-training":  # a site's local DP-SGD, as the coordinator waits
        import clients.app

        _wrap(clients.app, "run_train", call)
    elif point == "after-run-ledger-append":  # the run ledger has the spend, state.json not
        from fedllm.privacy.ledger import Ledger

        run_ledger = os.path.join(run_dir, "ledger.jsonl")
        _wrap(Ledger, "append", call, after=True, when=lambda s, *_: str(s.path) == run_ledger)
    elif point == "checkpoint-write":  # the adapter file of a checkpoint, half made
        import fedllm.model

        _wrap(fedllm.model, "write_file", call)
    elif point == "evaluation":  # a site evaluating the new global adapter
        import clients.app

        _wrap(clients.app, "run_evaluate", call)
    elif point == "safety-screen":  # the coordinator screening the candidate model
        from fedllm.safety.screen import Screener

        _wrap(Screener, "screen", call)
    elif point == "state-save":  # state.json's temporary file written, not yet renamed
        import fedllm.rundir

        state = os.path.join(run_dir, "state.json")
        _wrap(fedllm.rundir.Path, "replace", call, when=lambda s, t: str(t) == state)
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def launch(point: str, call: int, sites: int, overrides: dict[str, Any]) -> None:
    """One run in this process, armed to die at `point`."""
    run_dir = os.path.join(overrides["run.output-dir"], overrides["run.name"])
    arm(point, call, os.path.abspath(run_dir))
    from tests.inprocess import run_in_process

    run_in_process(overrides, sites=sites)


def serve() -> None:
    """Import the apps once, then run each request (a JSON line on stdin: point, call,
    sites, overrides, log) in a fresh child forked from this clean process, and answer its
    exit status (negative: the signal that killed it). Forking is safe here because this
    process never runs a torch op or starts a thread; it saves each launch the ~6 s of
    importing torch, transformers, Opacus and Flower."""
    import clients.app  # noqa: F401  (what every child would import first)
    import fedllm.safety.screen  # noqa: F401
    import tests.inprocess  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: its output to the request's log, then the run
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 0
            try:
                launch(request["point"], request["call"], request["sites"], request["overrides"])
            except BaseException:  # a run that fails is an exit status, as for any process
                import traceback  # only on failure

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": code}), flush=True)


def main(argv: list[str]) -> None:
    if argv == ["serve"]:
        serve()
        return
    point, call, sites, raw = argv
    launch(point, int(call), int(sites), json.loads(raw))


if __name__ == "__main__":
    main(sys.argv[1:])
