"""Where a run's live progress goes (a terminal, plain lines in CI, or nowhere), and a guard so that it can
never hold up or end the run."""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where live progress goes (a terminal, plain lines in CI, or nowhere)."""

    def begin(self, run_id: str, limits: Any, model: str) -> None: ...
    def phase(self, name: str, detail: str = "") -> None: ...
    def event(self, kind: str, text: str) -> None: ...
    def status(self, **fields: Any) -> None: ...
    def end(self) -> None: ...


class Silent:
    def begin(self, run_id: str, limits: Any, model: str) -> None:
        pass

    def phase(self, name: str, detail: str = "") -> None:
        pass

    def event(self, kind: str, text: str) -> None:
        pass

    def status(self, **fields: Any) -> None:
        pass

    def end(self) -> None:
        pass


class Guarded:
    """A reporter that can never hold up or end the run: a terminal gone (an ssh drop; rich turns the broken
    pipe into SystemExit) or any error silences it for good, and long texts are cut (a 16 kB host name is
    not a progress line)."""

    TEXT_LIMIT = 300

    def __init__(self, inner: Reporter) -> None:
        self.inner: Reporter | None = inner

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, name)(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            log.warning("reporter_silenced error=%r", exc)
            self.inner = None

    def begin(self, run_id: str, limits: Any, model: str) -> None:
        self._call("begin", run_id, limits, model)

    def phase(self, name: str, detail: str = "") -> None:
        self._call("phase", name, detail[: self.TEXT_LIMIT])

    def event(self, kind: str, text: str) -> None:
        self._call("event", kind, text[: self.TEXT_LIMIT])

    def status(self, **fields: Any) -> None:
        self._call("status", **fields)

    def end(self) -> None:
        self._call("end")
