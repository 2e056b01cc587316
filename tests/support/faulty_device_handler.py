"""The real handler on a device that fails the way a GPU does when its CUDA context is poisoned (a device-side
assert, an illegal memory access): the failing call raises, and the device runs nothing afterwards. For tests
of what the handler then does, on machines without a GPU. Only a request with seed FAULT_SEED triggers it,
after REPORTS_BEFORE_FAULT progress reports, so that a streamed request has begun by then.

tests/test_faults.py builds an archive with this module as its entry point, beside the real handler files.
"""

import itertools

from style_transfer_handler import StyleTransferHandler

FAULT_SEED = 6502
REPORTS_BEFORE_FAULT = 4


class FaultyDeviceHandler(StyleTransferHandler):
    poisoned = False

    def _run(self, jobs, callback, *args, **options):
        if any(job.params.seed == FAULT_SEED for job in jobs):
            callback = self._failing_after(callback, REPORTS_BEFORE_FAULT)
        return super()._run(jobs, callback, *args, **options)

    def _failing_after(self, callback, reports: int):
        count = itertools.count(1)

        def failing(progress):
            if callback is not None:
                callback(progress)
            if next(count) == reports:
                self.poisoned = True
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return failing

    def _device_works(self) -> bool:
        return not self.poisoned and super()._device_works()
