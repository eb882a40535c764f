"""Math-verify worker: one JSON request per stdin line, one JSON reply per stdout line.

Run as a plain script (``python _mv_worker.py``), not as ``-m qalign...``, so
that the worker imports only math-verify: importing the ``qalign`` package
could pull in torch/transformers and cost seconds and hundreds of MB per worker.
This file must therefore not import anything from qalign.

Protocol (all lines are ASCII JSON):
    worker -> parent, once at start:  {"ready": true}
    parent -> worker:                 {"gold": str, "pred": str, "timeout": float}
    worker -> parent:                 {"ok": true, "equal": bool}
                                   or {"ok": false, "error": str}

The parent enforces the wall-clock deadline by killing this process. As a
backstop for the case where the parent itself dies mid-request (nobody left
to kill us, and a runaway sympy computation would spin forever), each request
also sets RLIMIT_CPU a little above its timeout, so the kernel terminates the
worker with SIGXCPU; big-integer arithmetic holds the GIL, so an in-process
timer could not interrupt it.
"""

from __future__ import annotations

import os
import sys

# Running a script puts its directory first on sys.path, where our own
# extract.py/verify.py/... would shadow any top-level module of the same name.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import json
import logging
import resource

# Seconds of CPU allowed beyond the request's timeout before the kernel kills
# us. Generous: the parent normally kills us first; this only bounds orphans.
_CPU_GRACE_S = 5


def _limit_cpu(timeout: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    want = int(used + timeout) + _CPU_GRACE_S
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (want, hard))


def main() -> None:
    # Keep the real stdout for the protocol and point fd 1 / sys.stdout at
    # stderr, so a stray print() inside a library cannot corrupt a reply.
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1, encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        # SIGXCPU dumps core by default; a killed worker must not litter the disk.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass

    # parsing_timeout/timeout_seconds=None make math-verify warn once per
    # process that it has no timeout; the parent provides it, so silence that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]

    def parse_answer(answer: str) -> list:
        # Answers arrive already extracted; wrap them so math-verify's LaTeX
        # extractor finds them. "\boxed{}" needs balanced braces, "$...$" is
        # the fallback for answers that are not.
        for wrapped in ("\\boxed{" + answer + "}", "$" + answer + "$"):
            parsed = parse(wrapped, configs, parsing_timeout=None)
            if parsed:
                return parsed
        return []

    def compare(gold: str, pred: str) -> bool:
        gold_parsed = parse_answer(gold)
        pred_parsed = parse_answer(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))

    compare("1", "1")  # load the LaTeX grammar now, not inside the first deadline
    reply_stream.write('{"ready": true}\n')

    while True:
        line = sys.stdin.readline()
        if not line:
            return  # parent closed the pipe (or died): exit quietly
        request = json.loads(line)
        _limit_cpu(float(request["timeout"]))
        try:
            reply = {"ok": True, "equal": compare(request["gold"], request["pred"])}
        except Exception as exc:  # report, stay alive for the next request
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        reply_stream.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group
        pass
