"""The relay wire protocol (DESIGN.md sections 2 and 2b), shared by the three roles.

Compatible with Dendrite's relay API: the same paths and bodies. The user ID in both
paths only names a server (its server name is the mailbox); this module always uses
the localpart below for it, and the relay accepts any localpart.
"""

from urllib.parse import quote

FEDERATION_PREFIX = "/_matrix/federation/v1"

# The namespace of this project's unstable identifiers (DESIGN.md section 2b).
UNSTABLE_NAMESPACE = "synapse_relay"

# The federation query type of relay discovery (DESIGN.md 2b, "Relay discovery"):
# GET /_matrix/federation/v1/query/synapse_relay.relays
RELAYS_QUERY_TYPE = f"{UNSTABLE_NAMESPACE}.relays"

# The localpart of the user ID this module puts in relay paths for a server's
# mailbox. Chosen to be obviously not a person; the relay ignores it.
MAILBOX_LOCALPART = "_relay"

MAX_PDUS = 50
MAX_EDUS = 100

# At most this many relays per destination: each transaction goes to all of them.
MAX_RELAYS = 20


def mailbox_user_id(server_name: str) -> str:
    return f"@{MAILBOX_LOCALPART}:{server_name}"


def send_relay_path(txn_id: str, destination: str) -> str:
    """Where to deposit transaction `txn_id` for `destination` on a relay."""
    return (
        f"{FEDERATION_PREFIX}/send_relay/{quote(txn_id, safe='')}"
        f"/{quote(mailbox_user_id(destination), safe='')}"
    )


def relay_txn_path(server_name: str) -> str:
    """Where `server_name` collects its mail on a relay."""
    return (
        f"{FEDERATION_PREFIX}/relay_txn/{quote(mailbox_user_id(server_name), safe='')}"
    )


# The namespace of this project's unstable identifiers (DESIGN.md section 2b).
UNSTABLE_NAMESPACE = "synapse_relay"

# The origin proof of a deposit: on a deposit body, beside a transaction in collect
# answers, and the column the relay keeps it in (DESIGN.md section 2b).
ORIGIN_AUTH = f"{UNSTABLE_NAMESPACE}.origin_auth"

# Where this project's unstable federation endpoints live.
UNSTABLE_PREFIX = f"/_matrix/federation/unstable/{UNSTABLE_NAMESPACE}"

# The key mailbox (DESIGN.md section 2b, docs/keys.rst): a server's keys held by
# its relays, below this prefix followed by the server's name.
KEYS_PREFIX = f"{UNSTABLE_PREFIX}/keys"
# Beside the answers of the key mailbox: the owner-signed snapshots they come from.
KEY_SNAPSHOTS = f"{UNSTABLE_NAMESPACE}.snapshots"


def keys_path(server_name: str, tail: str) -> str:
    """Where the key mailbox of `server_name` serves `tail` (e.g. "/stock")."""
    return f"{KEYS_PREFIX}/{quote(server_name, safe='')}{tail}"


# Batch collect (DESIGN.md section 2b): entries per answer when the request names
# no limit, and at most; acknowledged entry ids per request, at most.
COLLECT_DEFAULT_LIMIT = 10
COLLECT_MAX_LIMIT = 100
COLLECT_MAX_ACKNOWLEDGE = 1000
# The size budget of one batch collect answer: its entries' transactions add up to
# at most this many bytes of JSON, except that the first entry is always returned
# whatever its size (one transaction is at most one deposit request's body).
COLLECT_MAX_BYTES = 1024 * 1024


def collect_path(server_name: str) -> str:
    """Where `server_name` collects its mail in batches on a relay."""
    return f"{UNSTABLE_PREFIX}/collect/{quote(mailbox_user_id(server_name), safe='')}"
