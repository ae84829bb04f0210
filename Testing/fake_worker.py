"""A stand-in for the worker client the Slicer side talks to: the surface its tasks use (submit,
cancel, poll), each job answered on the next poll by the subclass's ``answer(job)``."""
from SAMFineTuneLib.client import Job


class FakeWorkerClient:
    starts = 1  # how many worker processes it has started (the interactive session asks)

    def __init__(self):
        self.jobs = []

    def submit(self, command, params, arrays=None):
        job = Job("j%d" % len(self.jobs), command, params)
        job.sent = dict(arrays or {})
        self.received(job)
        self.jobs.append(job)
        return job

    def received(self, job):
        """Called as a job is submitted (a subclass keeps what it was sent)."""

    def cancel(self, job):
        job.cancel_requested = True

    def poll(self, timeout=0.0):
        for job in self.jobs:
            if not job.done:
                self.answer(job)

    def answer(self, job):
        raise NotImplementedError
