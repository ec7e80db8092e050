"""SIGTERM and SIGUSR1, what Slurm and most schedulers send before preemption or at the time limit, and SIGUSR2,
what submitit (hydra/launcher=slurm) has Slurm send: the run finishes its current step, writes last.pt and exits
(see train.py); `resume=auto` continues it. SIGUSR2's earlier handler (submitit's, which requeues the job) is called
after the run has saved, so the requeued job finds the checkpoint."""

from __future__ import annotations

import signal
import threading

REQUESTS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
REQUEUE_SIGNAL = "SIGUSR2"  # submitit's; another SIGTERM handler (torch elastic's) would only end the stop early


class StopRequests:
    """Within `with`, the signals of REQUESTS set `received` (the first one's number) instead of ending the
    process; the previous handlers come back on exit. Outside the main thread (where Python cannot take signals)
    it does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for name in REQUESTS:
                number = getattr(signal, name, None)
                if number is not None:
                    self.previous[number] = signal.signal(number, self.receive)
        return self

    def receive(self, number: int, frame) -> None:
        if self.received is None:
            self.received = number

    def handed_on(self):
        """The handler the received signal had before, when it is the requeue signal: Stopped calls it once the job
        has wound up (train.py's logger closed, commands.py)."""
        return self.previous.get(self.received) if self.received == getattr(signal, REQUEUE_SIGNAL, None) else None

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()


def ignore_stop_requests(worker_id: int) -> None:
    """DataLoader workers ignore the requests (a scheduler signals every process of the job): the main process
    decides when the run stops, and a worker that died first would break the step it finishes."""
    for name in REQUESTS:
        number = getattr(signal, name, None)
        if number is not None:
            signal.signal(number, signal.SIG_IGN)
