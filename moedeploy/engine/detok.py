"""Incremental detokenization with stop strings.

Text is released only once it is final: a trailing U+FFFD (an incomplete UTF-8 character) and any tail that
could still grow into a stop string are held back. When a stop string appears, the text ends before it.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already released

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (newly final text, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            return self._release(text[:cut]), True
        return self._release(text[:self._safe_end(text)]), False

    def flush(self) -> str:
        """The rest of the text at the end of the request."""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new

    def _stop_at(self, text: str) -> int | None:
        start = max(self.sent - max((len(s) for s in self.stop), default=0), 0)
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        end = len(text.rstrip(REPLACEMENT))
        # a tail that is the start of a stop string may still become one: hold back the longest such tail
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n], 0, end)), default=0)
        return max(end - hold, self.sent)
