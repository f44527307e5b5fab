"""Content review: input filters refuse a request, output filters end a completion.

A filter is either
* a list file: one entry per line; `re:PATTERN` is a regular expression, anything else a word or
  phrase matched case-insensitively on word boundaries; blank lines and `#` comments are skipped;
* a Python hook `module:function` taking the text and returning a reason (str) or True to flag it,
  None or False to let it pass.

    nanoseek serve --model r1=ckpt --input-filter banned.txt --output-filter mypkg.review:check

A refused input is an HTTP 400 of type `content_policy_violation` (gRPC INVALID_ARGUMENT). Output is
reviewed as it streams: before a delta is sent, the completion's whole text so far (reasoning
included) is checked; a flagged delta is withheld and the completion ends with finish_reason
`content_filter`. A hook that raises flags the text (the filter fails closed) and is logged.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.errors import NanoseekError

logger = logging.getLogger(__name__)
Check = Callable[[str], str | None]


class ModerationError(NanoseekError):
    """A filter specification that cannot be loaded."""


def load_filter(spec: str) -> Check:
    """A check from a list file path or a `module:function` hook; returns the reason text is flagged, or None."""
    if Path(spec).is_file():
        return _list_filter(Path(spec))
    if re.fullmatch(r"[\w.]+:\w+", spec):
        return _hook_filter(spec)
    raise ModerationError(f"content filter {spec!r} is neither a file nor a `module:function` hook")


def _list_filter(path: Path) -> Check:
    patterns = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        source = entry[3:] if entry.startswith("re:") else rf"(?<!\w){re.escape(entry)}(?!\w)"
        try:
            patterns.append((entry, re.compile(source, re.IGNORECASE)))
        except re.error as error:
            raise ModerationError(f"{path}:{number}: bad regular expression {entry!r}: {error}") from None

    def check(text: str) -> str | None:
        for entry, pattern in patterns:
            if pattern.search(text):
                return f"matched {entry!r} of {path.name}"
        return None

    return check


def _hook_filter(spec: str) -> Check:
    module_name, function_name = spec.split(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ModerationError(f"cannot load content filter hook {spec}: {error}") from None

    def check(text: str) -> str | None:
        try:
            verdict = function(text)
        except Exception:
            logger.exception("content filter hook %s failed; treating the text as flagged", spec)
            return f"the content filter {spec} failed"
        if verdict is True:
            return f"flagged by {spec}"
        return verdict or None

    return check


@dataclass
class Moderator:
    """The server's input and output checks (none configured: everything passes)."""

    input_checks: Sequence[Check] = field(default_factory=list)
    output_checks: Sequence[Check] = field(default_factory=list)

    @classmethod
    def from_specs(cls, input_specs: Sequence[str] = (), output_specs: Sequence[str] = ()) -> Moderator:
        return cls([load_filter(s) for s in input_specs], [load_filter(s) for s in output_specs])

    def review_input(self, texts: Sequence[str]) -> str | None:
        """The reason the request is refused, or None."""
        return _first_flag(self.input_checks, texts)

    def review_output(self, text: str) -> str | None:
        """The reason a completion's text so far must not be shown, or None."""
        return _first_flag(self.output_checks, [text])


def _first_flag(checks: Sequence[Check], texts: Sequence[str]) -> str | None:
    for check in checks:
        for text in texts:
            reason = check(text)
            if reason:
                return reason
    return None
