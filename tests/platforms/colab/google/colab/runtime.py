"""Ending the runtime (colabtools google/colab/runtime.py: unassign).

As the real one: RuntimeManagementError without TBE_RUNTIME_ADDR; a POST to
http://$TBE_RUNTIME_ADDR/unassign (here: recorded, not sent); then `_output.eval_js(...)`, which goes
through the kernel (colabtools output/_js.py) and so raises AttributeError from a `!` child.
"""

import os as _os

from google.colab import _message
from google.colab import errors as _errors

__all__ = ["unassign"]


def unassign():
    addr = _os.environ.get("TBE_RUNTIME_ADDR")
    if not addr:
        raise _errors.RuntimeManagementError("Unable to find the runtime management service.")
    _message.record("runtime.unassign", addr=addr)
    _message.send_request("cell_javascript_eval", {"script": "google.colab.kernel.disconnect();"}, expect_reply=False)
