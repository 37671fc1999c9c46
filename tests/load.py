"""Client threads that post acknowledged batches while a test breaks things around them:
the start/finish/count plumbing shared by the fault run and the Cassandra stack test."""

from __future__ import annotations

import threading


class PostingThreads:
    """``count`` daemon threads running ``self._run(n)`` until ``stop`` is set; each
    acknowledged batch goes into ``acked`` under ``lock``; anything a thread could not
    finish goes into ``problems``."""

    def __init__(self, count: int, batch_deadline_s: float):
        self.batch_deadline_s = batch_deadline_s
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[list[dict]] = []
        self.problems: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(count)
        ]

    def _run(self, n: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.batch_deadline_s + 30)
            if thread.is_alive():
                self.problems.append(f"{thread.name} did not finish its last batch")

    def acknowledged(self) -> int:
        with self.lock:
            return len(self.acked)
