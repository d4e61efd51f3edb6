"""Stop strings matched on decoded text, holding back only what could still become a stop."""

from __future__ import annotations


class StopTextFilter:
    """Feed text as it is decoded; get back what is safe to send and whether a stop matched.

    A stop string can span tokens, so text that might be the start of one is held back until the
    next piece decides. The stop string itself is never returned.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = self._earliest_stop(buffer)
        if cut is not None:
            self._held = ""
            self.matched = min(
                (stop for stop in self._stops if buffer.find(stop) == cut), key=len, default=None
            )
            return buffer[:cut], True
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """What was held back, once the sequence has ended without completing a stop."""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, buffer: str) -> int | None:
        found = [index for stop in self._stops if (index := buffer.find(stop)) >= 0]
        return min(found) if found else None

    def _longest_partial_stop(self, buffer: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
