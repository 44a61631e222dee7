"""Notices a SuperNode stuck on a reply that will never arrive whole (a Flower 1.39 bug).

A ClientApp hands its reply to the SuperNode in two steps: the message, then its objects (the
weights). Killed between the two (SIGKILL, the out-of-memory killer), it leaves the SuperNode
waiting for the missing objects forever: Flower's push loop polls its object store with no
deadline, and meanwhile handles no other message of any job, so the institution is lost to the
consortium until someone restarts it. The daemon restarts it (client/daemon.py); this module
decides when, from the lines the SuperNode and the bundle gate print.
"""

from __future__ import annotations

from dataclasses import dataclass

SENDING = "Sending: "  # the SuperNode starts forwarding a reply
SENT = ("Sent successfully", "Ignoring reply message", "Failed to send")  # ... and is done with it
CLIENTAPP_DIED = "a ClientApp was killed before finishing"  # the bundle gate's line (client/gate.py)
# A reply still not forwarded this long after its ClientApp died will never be. A whole model
# over a slow link may take longer, but its ClientApp does not die: that is the other condition.
STUCK_AFTER = 60.0
# The gate polls its ClientApps every second and the SuperNode its replies every half second:
# a death seen up to this long before the SuperNode picked the reply up may be its ClientApp's.
SAME_REPLY = 5.0


@dataclass
class ReplyWatch:
    """Fed every output line with the time it was read; says when the SuperNode is stuck."""

    stuck_after: float = STUCK_AFTER
    sending_since: float | None = None
    died_at: float | None = None

    def saw(self, line: str, now: float) -> None:
        if CLIENTAPP_DIED in line:
            self.died_at = now
        elif SENDING in line:
            self.sending_since = now
        elif any(done in line for done in SENT):
            self.sending_since = None

    def stuck(self, now: float) -> bool:
        return (
            self.sending_since is not None
            and self.died_at is not None
            and self.died_at >= self.sending_since - SAME_REPLY
            and now - max(self.sending_since, self.died_at) > self.stuck_after
        )
