"""Incremental detokenization with stop strings.

Decoding one token alone is wrong for byte-level BPE (a character can span
tokens, and spaces attach to neighbours), so each step decodes a short window
and emits what it adds. Text that might be the start of a stop string is held
back until it is known not to be one, so a stream never shows any part of a
stop string.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], resumed=(), emitted: int = 0):
        """resumed: tokens an earlier attempt generated (they follow prompt_ids), of whose text it
        handed out `emitted` chars: their text is this one's start, so a stop string can span
        the two attempts and what the earlier one held back comes out here."""
        self.tok = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = list(prompt_ids[-4:])  # a little context for the first token's spacing
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""  # all generated text so far (what is known to be final)
        self.emitted = 0  # chars of self.text already handed out
        if tokenizer is not None:
            for t in resumed:
                self._append(t)
            self.emitted = min(int(emitted), len(self.text))

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Feed one token; returns (text delta to emit now, hit a stop string)."""
        if self.tok is None:
            return "", False
        self._append(token_id)
        return self._release()

    def _append(self, token_id: int):
        self.ids.append(token_id)
        self._take(final=False)

    def _take(self, final: bool):
        """Move the text the tokens since `read` add into self.text. Mid-stream, not while it ends in
        an incomplete character (U+FFFD: the next token may complete it); at the end, as it is."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _release(self) -> tuple[str, bool]:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                end = min(hits)
                delta = self.text[self.emitted:end] if end > self.emitted else ""
                self.text = self.text[:end]
                self.emitted = len(self.text)
                return delta, True
            # hold back the longest tail that is a proper prefix of some stop string
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                    if self.text.endswith(s[:k]):
                        hold = k
                        break
            end = len(self.text) - hold
        else:
            end = len(self.text)
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta, False

    def flush(self) -> tuple[str, bool]:
        """At the end of a request: whatever was held back, up to a stop string if one is now
        complete (then True: the answer ended on a stop string). Tokens still waiting for the
        rest of a character come out as a full decode shows them (U+FFFD for the incomplete
        bytes), so a complete character they also hold is not lost and the text is the
        generated tokens' decode."""
        if self.tok is None:
            return "", False
        if self.read < len(self.ids):
            self._take(final=True)
        delta, hit = self._release()
        if not hit:
            delta += self.text[self.emitted:]
            self.emitted = len(self.text)
        return delta, hit
