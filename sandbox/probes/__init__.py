"""The conformance probe suite: hostile programs run inside a sandbox, judged from outside."""
