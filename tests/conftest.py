"""Shared pytest configuration.

Triton reads ``TRITON_INTERPRET`` when kernels are decorated, so the interpreter tests in
``tests/interpret/`` only make sense in a process started with that variable set; the normal
run skips collecting them and a test launches them in their own pytest process.
"""

import os

collect_ignore_glob = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpret/*"]
