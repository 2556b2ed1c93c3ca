#!/usr/bin/env python3
"""Fuzz the back-end at scale: the generators of tests/fuzz, plain seeded random, no shrinking.

Two targets, run in alternating batches until both counts are reached or the
time is up:

* messages: random and mutated vhost-user message sequences on fresh
  connections to a live back-end process (tests/fuzz/fuzzlib.py,
  ``run_message_case``); after each case its fds must be back to what they
  were, and every ``--check-every`` cases a fresh front-end must read correct data;
* chains: random rings through the descriptor walker and the blk device,
  in-process (``run_chain_case``).

Every case is named by ``--seed`` and its number, and ``--replay messages:N``
or ``--replay chains:N`` runs just that one again (with the back-end's debug
log). A crash (the back-end died, or an unexpected exception in-process)
restarts the target and goes on; a hang (no reply and no close within 2 s, a
pop + process over 1 s) too. The exit status is 1 when anything failed.

    .venv/bin/python scripts/fuzz.py --messages 1000000 --chains 1000000 --seconds 86400
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz"), str(ROOT / "backend")]

import fuzzlib  # noqa: E402
from live_backend import Violation  # noqa: E402

IMAGE_BYTES = 4 << 20
READ_BYTES = 64 << 10


class Hang(Exception):
    pass


def _alarm(_signum, _frame):
    raise Hang("watchdog: the case did not return")


class Failures:
    def __init__(self, limit: int = 20) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []
        self.limit = limit

    def add(self, kind: str, case: str, detail: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < self.limit:
            self.examples.append(f"{kind} {case}: {detail.strip()[:3000]}")
        print(f"!! {kind} in {case}: {detail.strip().splitlines()[0][:200]}", flush=True)


class MessageTarget:
    """A live back-end, restarted after a crash or a hang."""

    def __init__(self, workdir: Path, log_level: str) -> None:
        self.workdir = workdir
        self.image = workdir / "disk.img"
        self.image.write_bytes(os.urandom(IMAGE_BYTES))
        self.head = self.image.read_bytes()[:READ_BYTES]
        self.log_level = log_level
        self.refusals: collections.Counter[str] = collections.Counter()
        self.ends: collections.Counter[str] = collections.Counter()
        self.starts = 0
        self.backend: fuzzlib.LiveBackend | None = None
        self.start()

    def start(self) -> None:
        self.starts += 1
        sock = self.workdir / f"b{self.starts}.sock"
        log = self.workdir / f"backend{self.starts}.log"
        self.backend = fuzzlib.LiveBackend(self.image, sock, log, log_level=self.log_level)
        self.backend.sessions += 1
        self.offers = fuzzlib.learn_offers(sock)
        self.backend.wait_disconnected()
        fuzzlib.read_check(self.backend, self.head)
        self.baseline = self.backend.fds()

    def harvest(self) -> None:
        if self.backend is not None:
            self.refusals.update(self.backend.refusals)
            self.ends.update(self.backend.disconnect_kinds)
            self.backend.refusals.clear()
            self.backend.disconnect_kinds.clear()

    def restart(self) -> None:
        self.harvest()
        assert self.backend is not None
        self.backend.stop(timeout=5)
        self.start()

    def run(self, index: int, seed: int, check: bool) -> None:
        backend = self.backend
        assert backend is not None
        pool = fuzzlib.FdPool()
        try:
            d = fuzzlib.RandomDraw(random.Random(f"{seed}:messages:{index}"))
            planner = fuzzlib.MessagePlanner(d, pool, *self.offers)
            steps = planner.plan()
            fuzzlib.run_message_case(backend, steps, *self.offers)
        finally:
            pool.close()
        fds = backend.fds()
        if fds != self.baseline:
            extra = {k: v for k, v in fds.items() if self.baseline.get(k) != v}
            self.baseline = fds  # report each leak once
            raise Violation(f"fds changed after the session: {extra}")
        if check:
            fuzzlib.read_check(backend, self.head)
        if len(backend.refusals) > 5000 or sum(backend.disconnect_kinds.values()) > 10000:
            self.harvest()

    def close(self) -> int:
        self.harvest()
        assert self.backend is not None
        return self.backend.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, help="message cases (0: none)")
    parser.add_argument("--chains", type=int, default=100000, help="ring cases (0: none)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="default: from the clock")
    parser.add_argument("--check-every", type=int, default=10,
                        help="a fresh front-end reads and checks data every N message cases")
    parser.add_argument("--progress", type=float, default=10.0,
                        help="seconds between progress lines")
    parser.add_argument("--replay", default=None, help="messages:N or chains:N: that case alone")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    # The in-process device logs every refusal: counted here, not printed.
    logging.getLogger("pyvhost_user").addHandler(logging.NullHandler())
    logging.getLogger("pyvhost_user").propagate = False
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"seed {seed}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="pyvu-fuzz-"))
    failures = Failures()
    counts = collections.Counter()
    chain_outcomes = fuzzlib.ChainOutcome()
    signal.signal(signal.SIGALRM, _alarm)
    started = time.monotonic()
    only = None
    if args.replay:
        kind, _, number = args.replay.partition(":")
        only = (kind, int(number))
        args.messages = 1 if kind == "messages" else 0
        args.chains = 1 if kind == "chains" else 0

    messages = MessageTarget(workdir, "debug" if only else "info") \
        if args.messages else None
    rig = fuzzlib.RingRig(workdir / "rig.img") if args.chains else None
    last_progress = started

    def out_of_time() -> bool:
        return args.seconds is not None and time.monotonic() - started > args.seconds

    def progress(force: bool = False) -> None:
        nonlocal last_progress
        now = time.monotonic()
        if force or now - last_progress >= args.progress:
            last_progress = now
            print(f"[{now - started:8.0f} s] messages {counts['messages']}/{args.messages}  "
                  f"chains {counts['chains']}/{args.chains}  failures {dict(failures.counts)}",
                  flush=True)

    try:
        def more() -> bool:
            return counts["messages"] < args.messages or counts["chains"] < args.chains

        while more() and not out_of_time():
            for _ in range(100):
                if messages is None or counts["messages"] >= args.messages or out_of_time():
                    break
                i = only[1] if only else counts["messages"]
                case = f"messages:{i}"
                counts["messages"] += 1
                try:
                    messages.run(i, seed, check=(i % args.check_every == 0) or bool(only))
                except Violation as exc:
                    backend = messages.backend
                    dead = backend is not None and not backend.alive()
                    text = str(exc)
                    kind = "crash" if dead else "hang" if "within" in text else "violation"
                    tail = backend.log_tail(30) if backend else ""
                    failures.add(kind, case, text + "\n" + tail)
                    if dead or kind == "hang" or not backend.alive():
                        messages.restart()
                except Exception:
                    failures.add("harness error", case, traceback.format_exc())
                    messages.restart()
                progress()
            for _ in range(1000):
                if rig is None or counts["chains"] >= args.chains or out_of_time():
                    break
                i = only[1] if only else counts["chains"]
                case = f"chains:{i}"
                counts["chains"] += 1
                d = fuzzlib.RandomDraw(random.Random(f"{seed}:chains:{i}"))
                signal.setitimer(signal.ITIMER_REAL, 5.0)
                try:
                    fuzzlib.run_chain_case(rig, d, chain_outcomes)
                except Violation as exc:
                    kind = "hang" if "took" in str(exc) else "violation"
                    failures.add(kind, case, str(exc))
                except Hang:
                    failures.add("hang", case, traceback.format_exc())
                except Exception:
                    failures.add("crash", case, traceback.format_exc())
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                progress()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        progress(force=True)
        status = messages.close() if messages is not None else 0
        if rig is not None:
            rig.close()
        if messages is not None and status != 0:
            failures.add("crash", "shutdown", f"the back-end exited with {status} on SIGTERM")

    elapsed = time.monotonic() - started
    print()
    print(f"seed {seed}, {elapsed:.0f} s")
    print(f"cases: messages {counts['messages']}, chains {counts['chains']}")
    if messages is not None:
        print(f"back-end starts: {messages.starts}")
        for line in fuzzlib.summary(messages.refusals, "distinct refusals (back-end log)", 10000):
            print(line)
        for line in fuzzlib.summary(messages.ends, "session ends"):
            print(line)
    if rig is not None:
        for line in fuzzlib.summary(chain_outcomes.results, "chain outcomes"):
            print(line)
    print(f"crashes: {failures.counts['crash']}")
    print(f"hangs: {failures.counts['hang']}")
    print(f"violations: {failures.counts['violation']}")
    print(f"harness errors: {failures.counts['harness error']}")
    for example in failures.examples:
        print("----")
        print(example)
    if args.keep or failures.counts:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures.counts else 0


if __name__ == "__main__":
    sys.exit(main())
