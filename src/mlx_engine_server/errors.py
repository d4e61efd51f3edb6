"""Every error this server reports: start-up failures and OpenAI-shaped API errors.

Imports nothing of ours, so any module may raise these.
"""

from __future__ import annotations


class StartupError(Exception):
    """A problem that stops the server from starting (bad model path, bad adapter, bad GGUF).

    The message is shown to the operator as it is: make it say what is wrong and what to do.
    """
