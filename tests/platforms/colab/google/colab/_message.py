"""How Colab's Python side talks to the notebook frontend (colabtools google/colab/_message.py, _ipython.py).

`send_request` starts with `_ipython.get_kernelapp()`, i.e. `IPython.get_ipython().kernel.parent`: in a
process that is not the notebook's kernel (a `!` command, a subprocess) `get_ipython()` is None and this
raises AttributeError ('NoneType' object has no attribute 'kernel'). Every kernel-bound service
(userdata.get, drive.mount, auth.authenticate_user's sign-in, runtime.unassign's eval_js) goes through here.

The stand-in's frontend is a JSON file named by COLAB_STANDIN_FRONTEND (what the user set up in Colab's
UI); each request is appended to COLAB_STANDIN_CALLS so tests can check which process made it. Its
"timeouts"/"errors" maps make the next N GetSecret requests for a key go unanswered (colabtools'
read_reply_from_input returns None after `timeout_sec`, 10 s for userdata.get) or answered with an error
(MessageError), which are how a secret fails to arrive on Colab.
"""

from __future__ import annotations

import json
import os

import IPython
from google.colab import errors


class MessageError(errors.Error):
    """Thrown on error response from frontend."""


def _kernel():
    return IPython.get_ipython().kernel  # AttributeError outside a kernel, exactly as colabtools' get_kernel()


def record(call: str, **details) -> None:
    """Append one line to the test's call log (never a secret's value)."""
    path = os.environ.get("COLAB_STANDIN_CALLS")
    if not path:
        return
    shell = IPython.get_ipython()
    line = {"call": call, "pid": os.getpid(), "in_kernel": getattr(shell, "kernel", None) is not None, **details}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def frontend() -> dict:
    path = os.environ.get("COLAB_STANDIN_FRONTEND")
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def send_request(request_type, request_body, parent=None, expect_reply=True):
    """Sends the given message to the frontend (needs the kernel, as in colabtools)."""
    _kernel()
    record(f"request:{request_type}", key=(request_body or {}).get("key") if isinstance(request_body, dict) else None)
    return 1 if expect_reply else None


def blocking_request(request_type, request="", timeout_sec=5, parent=None):
    """Calls the front end and returns its reply (here: computed from the COLAB_STANDIN_FRONTEND file)."""
    send_request(request_type, request, parent=parent)
    ui = frontend()
    if request_type == "GetSecret":
        key = request["key"]
        for knob in ("timeouts", "errors"):  # the next N requests for KEY get no reply / an error reply
            if ui.get(knob, {}).get(key, 0) > 0:
                ui[knob][key] -= 1
                with open(os.environ["COLAB_STANDIN_FRONTEND"], "w", encoding="utf-8") as f:
                    json.dump(ui, f)
                if knob == "errors":
                    raise MessageError("the frontend could not answer (stand-in)")
                return None  # read_reply_from_input: no reply before the timeout → None
        secrets = ui.get("secrets", {})
        return {"exists": key in secrets, "access": key not in ui.get("denied", []), "payload": secrets.get(key, "")}
    if request_type == "request_auth":
        if not ui.get("sign_in", True):
            raise MessageError("credential propagation was unsuccessful")
        return None
    return None
