"""Generated token ids -> the text a caller sees, as a whole and as streamed pieces.

The whole text is what :meth:`runtime.pipeline.Blip2Runtime.generate` returns (the decoded ids, stripped),
cut before the first stop string when the request gave any. The streamed pieces concatenate to exactly
that text: leading whitespace is dropped, and a tail that may still change is held back (trailing
whitespace, an incomplete UTF-8 character, the beginning of a stop string).
"""

from __future__ import annotations

from collections.abc import Sequence


class TextAssembler:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.emitted = ""

    def _text(self, ids: Sequence[int]) -> tuple[str, bool]:
        text = self.tokenizer.decode(list(ids)).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        return text, False

    def update(self, ids: Sequence[int]) -> tuple[str, bool]:
        """The new piece of text after ``ids`` (all generated ids so far), and whether a stop string appeared."""
        text, hit = self._text(ids)
        if hit:
            return "", True
        safe = text.rstrip()
        if safe.endswith("\ufffd"):  # a character whose bytes are not all generated yet
            safe = safe.rstrip("\ufffd")
        for s in self.stop:  # hold back what may turn out to start a stop string
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        return self._advance(safe.rstrip()), False

    def final(self, ids: Sequence[int]) -> tuple[str, str]:
        """(the whole text, the piece not streamed yet)."""
        text = self._text(ids)[0].strip()
        return text, self._advance(text)

    def _advance(self, safe: str) -> str:
        if not safe.startswith(self.emitted) or len(safe) <= len(self.emitted):
            return ""
        piece = safe[len(self.emitted):]
        self.emitted = safe
        return piece
