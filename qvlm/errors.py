"""User-facing errors.

Every expected failure (bad bit-width, missing checkpoint, empty calibration set, NaN activations, unknown
method …) raises `QVLMError` with ONE line that names the problem and the fix. The CLI prints that line
(no traceback) and exits with status 2.
"""


class QVLMError(ValueError):
    """An expected, user-fixable error: the message is one line naming the problem and the fix."""

    def __init__(self, problem: str, fix: str = ""):
        msg = problem if not fix else f"{problem} -- fix: {fix}"
        assert "\n" not in msg, "QVLMError messages are one line"
        super().__init__(msg)
