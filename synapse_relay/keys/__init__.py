"""The key mailbox: encrypted conversations start while a server is offline.

A server keeps on each of its relays a *snapshot* of what others need to start Olm
sessions with its users, and a small *stock* of one-time keys per device; servers
that cannot reach it ask its relays instead (DESIGN.md section 2b, docs/keys.rst).
Three sides, each its own class and module, with the wire format they share
(snapshots, claims, query answers, their checks and limits) in `snapshot`:

- `depositor.KeyDepositor` (receive role, the key owner): periodically signs a
  snapshot per user with the server's key and uploads the changed ones, with
  one-time keys moved out of Synapse's own pool so that only the relay hands them
  out;
- `mailbox.KeyMailbox` (relay role): checks and stores snapshots, and answers
  `/user/devices`, `/user/keys/query` and `/user/keys/claim` for the server, each
  escrowed key at most once, then the device's fallback key;
- `fallback.KeyFallback` (send role side, every process): answers Synapse's own
  key requests to an unreachable server from its relays, after checking the
  owner's signature on every snapshot and the device's on every key.

Synapse's internals they rely on are in `synapse_relay._synapse.keys`. This package
gives start-up (`RelayModule`) one function per side.
"""

from synapse_relay.keys.depositor import start_key_deposits
from synapse_relay.keys.fallback import start_key_fallback
from synapse_relay.keys.mailbox import start_key_mailbox

__all__ = ["start_key_deposits", "start_key_fallback", "start_key_mailbox"]
