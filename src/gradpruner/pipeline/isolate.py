"""One pipeline stage in a process of its own: its peak memory is its own, nothing it loaded lingers,
and stopping the pipeline (Ctrl-C, ``kill``, a scheduler's time limit) stops the stage with it."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from gradpruner.measure.costs import measure
from gradpruner.util.atomic import write_json


def _child_main(fn, args, kwargs, result_path: str) -> None:
    """Run one stage in a fresh process, so its peak memory is its own and nothing lingers."""
    import resource

    from gradpruner.errors import GradPrunerError

    try:
        with measure() as u:
            result = fn(*args, **kwargs)
        usage = u.as_dict()
        usage["peak_rss_mb"] = round(max(usage["peak_rss_mb"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), 1)
        write_json(result_path, {"result": result, "usage": usage})
    except GradPrunerError as exc:
        write_json(result_path, {"error": exc.problems})


@contextlib.contextmanager
def _terminate_on_sigterm():
    """While a stage process runs, SIGTERM to this one raises SystemExit here, so the stage process is
    stopped too instead of running on alone (``kill PID``, a job scheduler's time limit)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def in_child(fn, args, kwargs, result_path: Path):
    """Run ``fn(*args, **kwargs)`` in a spawned process and return ``(result, usage)``: its JSON-able
    result and its wall time and peak memory. The process writes both to ``result_path``; a
    ``GradPrunerError`` there is raised again here, a process that died without writing is reported in
    one sentence, and Ctrl-C or a SIGTERM here stops the process before going on."""
    import multiprocessing

    from gradpruner.errors import GradPrunerError

    result_path.unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(target=_child_main, args=(fn, args, kwargs, str(result_path)))
    proc.start()
    with _terminate_on_sigterm():
        try:
            proc.join()
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a SIGTERM to this process (kill, a scheduler)
            proc.terminate()
            proc.join()
            raise
    if not result_path.is_file():
        raise GradPrunerError(f"Stage process stopped with exit code {proc.exitcode} before finishing; "
                              "see the messages above, then rerun (finished stages are kept).")
    out = json.loads(result_path.read_text())
    result_path.unlink()
    if "error" in out:
        raise GradPrunerError(*out["error"])
    return out["result"], out["usage"]
