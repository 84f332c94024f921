"""``python -m harness SPEC``: one worker process of :func:`harness.runner.compare`."""

import json
import sys

from .runner import _worker

_worker(json.loads(sys.argv[1]))
