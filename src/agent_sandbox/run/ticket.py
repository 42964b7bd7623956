"""Tickets: a task written by someone else (an issue tracker, a webhook). The text is untrusted input: it
becomes the agent's task and the pull request's title, and nothing else. No field of a ticket is ever read
as configuration: the policy, the limits and the credentials come only from the operator."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agent_sandbox.errors import UsageError

MAX_TICKET_BYTES = 256 * 1024


class Ticket(BaseModel):
    """A ticket's title and body."""

    # Trackers send more fields; none of them is used.
    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    title: str
    """One line: the pull request's title."""
    body: str = ""
    """The rest of the ticket."""

    def as_task(self) -> str:
        return f"{self.title.strip()}\n\n{self.body.strip()}".strip() + "\n"


def parse_ticket(text: str, source: str = "ticket") -> Ticket:
    """JSON with `title` and `body`, or Markdown whose first non-empty line is the title."""
    stripped = text.strip()
    if not stripped:
        raise UsageError(f"{source}: the ticket is empty")
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
            ticket = Ticket.model_validate(data)
        except (ValueError, ValidationError) as exc:
            raise UsageError(f"{source}: not a ticket (JSON with a 'title' and a 'body'): {exc}") from None
    else:
        first, _, rest = stripped.partition("\n")
        ticket = Ticket(title=first.lstrip("#").strip(), body=rest)
    title = " ".join(ticket.title.split())
    if not title:
        raise UsageError(f"{source}: the ticket has no title")
    return Ticket(title=title[:200], body=ticket.body)


def load_ticket(path: str) -> Ticket:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read ticket {p}: {exc.strerror}") from None
    if len(data) > MAX_TICKET_BYTES:
        raise UsageError(f"{p}: the ticket is larger than {MAX_TICKET_BYTES // 1024} KiB")
    return parse_ticket(data.decode("utf-8", errors="replace"), str(p))
