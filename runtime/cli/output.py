"""What the verbs print in common: one-line errors, JSON lines of messages, label lists.

Text a tenant or a sandbox chose (argv, names, the daemon's messages quoting them) is shown
escaped through `visible`, so a line reads as what was recorded and cannot drive the
terminal.
"""

from __future__ import annotations

import json
import sys

from corral.runtime.terminal import visible


def fail(message: str, code: int = 1, *, escape: bool = True) -> int:
    """Print `corral: MESSAGE` on stderr and return the exit status `code`.

    Args:
        escape: False for a message only this user's own input made (a local run), which
            is printed as it is.
    """
    print(f"corral: {visible(message) if escape else message}", file=sys.stderr)
    return code


def print_json_lines(messages, *, proto_names: bool = False, sort_keys: bool = False) -> None:
    """One JSON object per protobuf message on stdout (--json of the listing verbs)."""
    from google.protobuf import json_format

    for message in messages:
        print(json.dumps(json_format.MessageToDict(
            message, preserving_proto_field_name=proto_names), sort_keys=sort_keys))


def shown_labels(labels) -> str:
    """k=v,k2 (a bare key for an empty value), sorted; '-' for none."""
    return ",".join(f"{k}={v}" if v else k for k, v in sorted(labels.items())) or "-"

