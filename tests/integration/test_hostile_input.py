"""Every input gets a 4xx, never a 5xx (issue 13): property-based tests with
hypothesis against a real homeserver, over HTTP, on every endpoint of the module.

Inputs: arbitrary JSON texts (huge, tiny and special numbers such as 1e400, -0.0,
2**64 and NaN/Infinity literals; lone surrogate escapes; NUL; duplicate keys; deep
nesting; oversized bodies; bytes that are not JSON or not UTF-8) as bodies, and odd
percent-encodings (%00, %2F, overlong and invalid UTF-8) in path parameters and
queries. Federation requests are signed for real by fake servers
(tests/harness/fedclient.py) and sent byte for byte (tests/harness/rawclient.py).

Asserted for every request: no 5xx; every error is a JSON Matrix error with an
errcode. Asserted after each endpoint's run: the relay still serves, and the
mailboxes hold exactly what was answered 200 (deposits), lost only what a 200
answer acknowledged (relay_txn), and the admin API holds what it last answered.
After the module: the homeserver logged no ERROR and no traceback.

The runs are bounded for CI: a fixed number of examples per endpoint, derandomized
(the same inputs on every run), no example database. `HOSTILE_EXAMPLES=<n>` runs
n per endpoint instead, for a longer hunt.
"""

import json
import os
import string
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from canonicaljson import encode_canonical_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from signedjson.sign import sign_json

from synapse_relay import proof
from synapse_relay.protocol import (
    FEDERATION_PREFIX,
    KEYS_PREFIX,
    ORIGIN_AUTH,
    RELAYS_QUERY_TYPE,
    UNSTABLE_PREFIX,
)
from tests.harness.fedclient import KEY_ID, FakeServer, FakeServerFactory, quote
from tests.harness.homeserver import (
    Homeserver,
    HomeserverFactory,
    log_problems,
    select,
)
from tests.harness.rawclient import RawClient

pytestmark = pytest.mark.integration

T = TypeVar("T")

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    """Bounded, reproducible hypothesis settings for one endpoint's run."""
    return settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def weighted(*choices: tuple[int, st.SearchStrategy[T]]) -> st.SearchStrategy[T]:
    """One of the strategies, each as often as its weight says."""
    # st.one_of flattens its arguments into branches (a one_of into its own, a
    # mapped one_of too) and merges repeated ones: each copy of each choice must
    # be one new branch, which a mapped 1-tuple is. (flatmap would be slow.)
    return st.one_of(
        *(
            st.tuples(strategy).map(_only)
            for weight, strategy in choices
            for _ in range(weight)
        )
    )


def _only(one: tuple[T]) -> T:
    return one[0]


def mostly(
    usual: st.SearchStrategy[T], *others: st.SearchStrategy[T]
) -> st.SearchStrategy[T]:
    """`usual` three times in four, else one of `others`."""
    return weighted((3, usual), (1, st.one_of(*others)))


FED = FEDERATION_PREFIX
UNSTABLE = UNSTABLE_PREFIX
ADMIN = "/_synapse/relay/v1"

# --- JSON texts -------------------------------------------------------------------

# Numbers and strings that parse; canonical JSON (and so X-Matrix) holds the first
# ones, not the others.
ODD_NUMBERS = [
    "1E-400",
    "-0.0",
    "-0",
    "0e0",
    "1.0",
    "1e2",
    "18446744073709551616",  # 2**64
    "-9223372036854775809",  # below int64
    "9007199254740993",  # above 2**53
    "0." + "1" * 400,
]
UNENCODABLE_NUMBERS = [
    "1e400",
    "-1e400",
    "1" * 5000,  # beyond Python's int-from-text digit limit
    "NaN",
    "Infinity",
    "-Infinity",
]
ODD_STRINGS = ['"\\u0000"', '"\\ud83d\\ude00"', '"\u2028\u2029"', '"\\\\"']
UNENCODABLE_STRINGS = ['"\\ud800"', '"\\udfff\\ud800"', '"a\\ud83d"', '"\\uD800x"']
# Keys the module looks at somewhere, so that objects often reach its checks.
VOCABULARY = [
    "pdus",
    "edus",
    "origin",
    "origin_server_ts",
    "destination",
    "transaction_id",
    ORIGIN_AUTH,
    "entry_id",
    "relays",
    "acknowledge",
    "limit",
    "key",
    "sig",
]
ANY_CHARACTER = st.characters(blacklist_categories=())


def json_string(text: str) -> str:
    return json.dumps(text)  # ASCII-only: lone surrogates and NUL as \u escapes


def json_object(pairs: list[tuple[str, str]]) -> str:
    """An object from (key text, value text) pairs; keys may repeat."""
    return "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"


def json_array(items: list[str]) -> str:
    return "[" + ",".join(items) + "]"


def json_texts(hostile: bool) -> st.SearchStrategy[str]:
    """JSON texts with odd numbers and strings; with what canonical JSON cannot
    hold too if `hostile`."""
    numbers = ODD_NUMBERS + (UNENCODABLE_NUMBERS if hostile else [])
    strings = ODD_STRINGS + (UNENCODABLE_STRINGS if hostile else [])
    characters = ANY_CHARACTER if hostile else st.characters(codec="utf-8")
    texts = st.one_of(
        st.text(characters, max_size=20).map(json_string), st.sampled_from(strings)
    )
    keys = st.one_of(st.sampled_from(VOCABULARY).map(json_string), texts)
    scalars = st.one_of(
        st.sampled_from(["null", "true", "false"]),
        st.integers().map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(numbers),
        texts,
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4).map(json_array),
            st.lists(st.tuples(keys, children), max_size=4).map(json_object),
        ),
        max_leaves=10,
    )


def transactions(hostile: bool) -> st.SearchStrategy[str]:
    """Shaped like a deposit, so that many get past the first checks."""
    values = json_texts(hostile)
    keys = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=5)).map(json_string)
    object_lists = st.lists(
        st.lists(st.tuples(keys, values), max_size=4).map(json_object), max_size=3
    ).map(json_array)
    return st.builds(
        lambda pdus, edus, extra: json_object(
            [('"pdus"', pdus), *([('"edus"', edus)] if edus else []), *extra]
        ),
        st.one_of(object_lists, object_lists, object_lists, values),
        st.one_of(st.none(), object_lists, values),
        st.lists(st.tuples(keys, values), max_size=3),
    )


def deeply_nested(depth: int) -> str:
    return '{"pdus": [{"a": ' + "[" * depth + "]" * depth + "}]}"


def many(key: str, count: int) -> str:
    return json_object([(json_string(key), json_array(["{}"] * count))])


OVERSIZED = [
    many("pdus", 51),
    json_object([('"pdus"', "[]"), ('"edus"', json_array(["{}"] * 101))]),
    json_object([('"pdus"', json_array(['{"a": "' + "x" * 2**16 + '"}']))]),
    " " * 2**16 + "{}",
]
hostile_bodies: st.SearchStrategy[bytes | None] = st.one_of(
    transactions(hostile=True).map(str.encode),
    json_texts(hostile=True).map(str.encode),
    st.integers(1, 5000).map(deeply_nested).map(str.encode),
    st.sampled_from(OVERSIZED).map(str.encode),
    st.binary(max_size=40),
    st.sampled_from([b'{"pdus": ["\xc3\x28"]}', b'{"pdus": [], "a": "\xed\xa0\x80"}']),
    st.sampled_from([None, b"", b"{}", b"null", b'{"pdus": []}']),
)
bodies = weighted((1, transactions(hostile=False).map(str.encode)), (1, hostile_bodies))

# --- path parameters and queries ----------------------------------------------------

ODD_ESCAPES = [
    "%00",
    "%2F",
    "%2f",
    "%25",
    "%C0%AF",  # overlong "/"
    "%C0%80",  # overlong NUL
    "%C3%28",  # invalid UTF-8
    "%ED%A0%80",  # a surrogate, UTF-8 encoded
    "%F4%90%80%80",  # beyond U+10FFFF
    "%FF",
    "%",
    "%zz",
    "%E2%82",
    "..",
    "%2E%2E",
    "%40",
    "%3A",
    "%0A",
    "%0D%0A",
    "%20",
    "+",
    ";",
    "%23",
    "%3F",
    "%3F%26",
]
# What may appear unescaped in a path segment (RFC 3986 pchar, but "%").
PCHARS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@"
segments = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=30).map(lambda s: quote(s)),
    st.lists(
        st.one_of(st.sampled_from(ODD_ESCAPES), st.text(PCHARS, max_size=4)),
        max_size=6,
    ).map("".join),
    st.sampled_from(["x" * 300, quote("é" * 128), quote("\x7f"), "%00" * 10]),
)
SERVER_NAMES = [
    "localhost:1",
    "example.org",
    "[::1]:8448",
    "1.2.3.4",
    "a" * 300,
    "example.org:99999",
    "example.org:",
    "ex ample.org",
    "xn--e1afmkfd.example",
    "exa_mple.org",
    "[::1",
    "*",
]


txn_ids = mostly(st.text(PCHARS, min_size=1, max_size=12), segments)


def user_ids(owner: str) -> st.SearchStrategy[str]:
    """Quoted user ID path parameters, mostly of `owner`'s mailbox."""
    return mostly(
        st.just(quote(f"@_relay:{owner}")),
        st.text(PCHARS.replace(":", ""), min_size=1, max_size=8).map(
            lambda local: quote(f"@{local}:{owner}")
        ),
        st.builds(lambda s: f"%40{s}%3A{quote(owner)}", segments),
        st.sampled_from(SERVER_NAMES).map(lambda server: quote(f"@x:{server}")),
        segments,
    )


queries = mostly(
    st.one_of(st.just(""), st.integers(0, 100).map(lambda n: f"?entry_id={n}")),
    st.builds(lambda s: f"?entry_id={s}", segments),
    st.integers().map(lambda n: f"?entry_id={n}"),
    st.sampled_from(
        [
            "?entry_id=1&entry_id=2",
            "?entry_id=" + "9" * 40,
            "?entry_id=%EF%BC%91",  # a fullwidth 1
            "?entry_id",
            "?&&",
            "?entry_id=-1",
            "?entry_id=0x1",
            "?entry_id=1e3",
        ]
    ),
    st.builds(lambda s: f"?{s}", segments),
)

# --- the network --------------------------------------------------------------------


@dataclass
class Net:
    hs: Homeserver
    http: RawClient
    alice: FakeServer  # deposits
    bob: FakeServer  # the deposits' main destination
    carol: FakeServer  # collects under fuzzing
    dave: FakeServer  # checks that the relay still serves
    erin: FakeServer  # keeps keys under fuzzing
    admin_token: str
    user_token: str
    sent: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def net(
    homeserver_factory: HomeserverFactory, fake_servers: FakeServerFactory
) -> Iterator[Net]:
    alice, bob, carol, dave, erin = (fake_servers.create() for _ in range(5))
    hs = homeserver_factory.create(
        {
            # push and discovery off: hostile input must not make it contact
            # the (non-loopback) servers it names
            "relay": {"enabled": True, "destinations": ["*"], "push": False},
            "send": {
                "relays": {"localhost:1": [alice.server_name]},
                "discover": False,
            },
        }
    )
    with RawClient("127.0.0.1", hs.port) as http:
        net = Net(
            hs=hs,
            http=http,
            alice=alice,
            bob=bob,
            carol=carol,
            dave=dave,
            erin=erin,
            admin_token=hs.register_user("admin", admin=True),
            user_token=hs.register_user("user"),
        )
        yield net
    print(f"\nhostile requests to {hs}, by answer: {sorted(net.sent.items())}")
    assert log_problems(hs) == [], f"{hs} logged problems: {hs.log_path}"


def federation(
    net: Net,
    sender: FakeServer,
    method: str,
    uri: str,
    body: bytes | None,
    endpoint: str,
    sign_body: bool = True,
) -> tuple[int, Any]:
    """Send a signed federation request; its status and JSON answer, checked.

    The signature covers the body when `sign_body` and the body is a JSON object
    Synapse can check a signature over; otherwise the request is signed without
    content (the homeserver must refuse a body it cannot check with a 4xx).
    """
    content = signable(body) if sign_body else None
    headers = {
        "Authorization": sender.authorization(method, net.hs.server_name, uri, content)
    }
    if body is not None:
        headers["Content-Type"] = "application/json"
    return answer(net, endpoint, method, uri, body, headers)


def admin(
    net: Net, method: str, uri: str, body: bytes | None, token: str | None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    return answer(net, "admin", method, uri, body, headers)


def answer(
    net: Net,
    endpoint: str,
    method: str,
    uri: str,
    body: bytes | None,
    headers: dict[str, str],
) -> tuple[int, Any]:
    status, data = net.http.request(method, uri, body, headers)
    shown = f"{method} {uri} body={(body or b'')[:300]!r} -> {status} {data[:300]!r}"
    assert status < 500, shown
    value = json.loads(data)
    if status != 200:
        assert 400 <= status < 500, shown
        assert isinstance(value, dict), shown
        assert isinstance(value.get("errcode"), str), shown
        assert value["errcode"].startswith("M_"), shown
    net.sent[f"{endpoint} {status} {value.get('errcode', '')}".strip()] += 1
    return status, value


def signable(body: bytes | None) -> Any:
    """The body as the JSON object a signature covers, None if it cannot be one."""
    if not body:
        return None
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        encode_canonical_json(value)
    except (ValueError, RecursionError):  # includes Unicode errors
        return None
    return value if isinstance(value, dict) else None


def _no_constants(name: str) -> None:
    raise ValueError(name)


def path_arg(quoted: str) -> str:
    """A path parameter as Synapse hands it to a servlet."""
    return urllib.parse.unquote(quoted)


# --- checks that the relay still serves -----------------------------------------------


def deposit_ok(
    net: Net, sender: FakeServer, destination: str, txn_id: str, body: dict
) -> None:
    uri = f"{FED}/send_relay/{quote(txn_id)}/{quote('@_relay:' + destination)}"
    status, value = federation(
        net, sender, "PUT", uri, encode_canonical_json(body), "check"
    )
    assert status == 200, value


def collect_all(net: Net, owner: FakeServer) -> dict[int, dict]:
    """Every entry of `owner`'s mailbox, acknowledged; entry id -> transaction."""
    uri = f"{FED}/relay_txn/{quote('@_relay:' + owner.server_name)}"
    entries: dict[int, dict] = {}
    entry_id = 0
    while True:
        body = encode_canonical_json({"entry_id": entry_id})
        status, value = federation(net, owner, "GET", uri, body, "check")
        assert status == 200, value
        if not value["entries_queued"]:
            return entries
        entry_id = value["entry_id"]
        entries[entry_id] = value["transaction"]


def assert_still_serves(net: Net) -> None:
    txn = {"pdus": [{"still": "serving"}], "edus": []}
    deposit_ok(net, net.alice, net.dave.server_name, "still-serving", txn)
    (stored,) = collect_all(net, net.dave).values()
    assert stored["pdus"] == txn["pdus"]


def queued(net: Net) -> Counter[str]:
    status, value = admin(net, "GET", f"{ADMIN}/queues", None, net.admin_token)
    assert status == 200, value
    return Counter({q["destination"]: q["transactions"] for q in value["queues"]})


# --- the properties -------------------------------------------------------------------


Deposit = tuple[str, str, bytes | None]  # txn id and user ID (quoted), body


def plain_deposits(net: Net) -> st.SearchStrategy[Deposit]:
    return st.tuples(txn_ids, user_ids(net.bob.server_name), bodies)


def proven_deposits(net: Net) -> st.SearchStrategy[Deposit]:
    """Deposits with an origin proof (DESIGN.md 2b) made by alice for bob, mostly
    valid, with odd content; else altered after signing."""
    values = json_texts(hostile=False).map(json.loads)
    objects = st.dictionaries(st.text(max_size=5), values, max_size=3)
    now = st.integers(0, 10**6).map(lambda ago: int(time.time() * 1000) - ago)
    transactions = st.fixed_dictionaries(
        {
            "origin": mostly(st.just(net.alice.server_name), values),
            "origin_server_ts": mostly(now, values),
            "destination": mostly(st.just(net.bob.server_name), values),
            "transaction_id": st.text(PCHARS, min_size=1, max_size=12),
            "pdus": mostly(st.lists(objects, max_size=3), values),
            "edus": mostly(st.lists(objects, max_size=3), values),
        }
    )

    def prove(transaction: dict, key: str, alter: dict) -> Deposit:
        signed = sign_json(
            proof.signed_request(transaction),
            net.alice.server_name,
            net.alice.signing_key,
        )
        sig = signed["signatures"][net.alice.server_name][KEY_ID]
        body = {**transaction, ORIGIN_AUTH: {"key": key, "sig": sig}, **alter}
        txn_id = transaction["transaction_id"]
        return (
            quote(txn_id),
            quote(f"@_relay:{net.bob.server_name}"),
            (encode_canonical_json(body)),
        )

    return st.builds(
        prove,
        transactions,
        mostly(st.just(KEY_ID), st.text(max_size=10)),
        mostly(
            st.just({}),
            st.dictionaries(
                st.sampled_from(["pdus", "edus", "origin_server_ts", "extra"]),
                values,
                min_size=1,
            ),
        ),
    )


@dataclass(frozen=True)
class DepositKind:
    name: str
    deposits: Callable[[Net], st.SearchStrategy[Deposit]]
    examples: int


DEPOSITS = [
    DepositKind("deposit", plain_deposits, 200),
    DepositKind("proven deposit", proven_deposits, 80),
]


@pytest.mark.parametrize("kind", DEPOSITS, ids=lambda kind: kind.name)
def test_deposits(net: Net, kind: DepositKind) -> None:
    """PUT send_relay/{txnID}/{userID}, with or without an origin proof: whatever
    the path and body, a 4xx or a 200; each destination's mailbox then holds
    exactly the deposits answered 200, the first of each transaction id, as
    deposited."""
    before = queued(net)
    # destination -> txn id -> the body first answered 200
    stored: dict[str, dict[str, Any]] = {}

    @fuzz(kind.examples)
    @given(deposit=kind.deposits(net))
    def deposit(deposit: Deposit) -> None:
        txn_id, user_id, body = deposit
        uri = f"{FED}/send_relay/{txn_id}/{user_id}"
        status, _ = federation(net, net.alice, "PUT", uri, body, kind.name)
        if status == 200:
            destination = path_arg(user_id).partition(":")[2]
            stored.setdefault(destination, {}).setdefault(
                path_arg(txn_id), json.loads(body or b"")
            )

    deposit()
    assert queued(net) - before == Counter(
        {destination: len(txns) for destination, txns in stored.items()}
    )
    collected = {t["transaction_id"]: t for t in collect_all(net, net.bob).values()}
    expected = stored.get(net.bob.server_name, {})
    assert collected.keys() == expected.keys()
    for txn_id, transaction in collected.items():
        assert transaction["origin"] == net.alice.server_name
        assert transaction["destination"] == net.bob.server_name
        assert transaction["pdus"] == expected[txn_id]["pdus"]
        assert transaction["edus"] == (expected[txn_id].get("edus") or [])
    assert_still_serves(net)


def entries(net: Net, owner: FakeServer) -> dict[int, str]:
    """`owner`'s mailbox, from the database: entry id -> transaction id."""
    rows = select(
        net.hs,
        "SELECT entry_id, txn_id FROM synapse_relay_entries WHERE destination = ?",
        owner.server_name,
    )
    return dict(rows)


@dataclass(frozen=True)
class Request:
    """One federation request: what to send, and as whom."""

    method: str
    uri: str
    body: bytes | None
    sign_body: bool
    by_owner: bool

    def named_entry_ids(self, key: str) -> set[int]:
        """Every integer the request names under `key` (in the body, also in
        the query), that is, as entries it acknowledges."""
        named: set[int] = set()
        content = signable(self.body) if self.sign_body else None
        value = content.get(key) if isinstance(content, dict) else None
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int):
                named.add(item)
        query = urllib.parse.urlsplit(self.uri).query
        for text in urllib.parse.parse_qs(query).get(key, []):
            if text.isascii() and text.isdigit():
                named.add(int(text))
        return named


def relay_txn_requests(owner: str) -> st.SearchStrategy[Request]:
    return st.builds(
        lambda method, user_id, query, body, sign_body, by_owner: Request(
            method, f"{FED}/relay_txn/{user_id}{query}", body, sign_body, by_owner
        ),
        mostly(st.just("GET"), st.sampled_from(["PUT", "POST", "DELETE"])),
        user_ids(owner),
        queries,
        mostly(
            st.one_of(
                st.none(),
                st.integers(0, 100).map(lambda n: b'{"entry_id": %d}' % n),
            ),
            bodies,
        ),
        mostly(st.just(True), st.just(False)),
        mostly(st.just(True), st.just(False)),
    )


def batch_collect_requests(owner: str) -> st.SearchStrategy[Request]:
    acknowledge = st.one_of(
        st.lists(st.integers(0, 100).map(str), max_size=5).map(json_array),
        json_texts(hostile=True),
    )
    limit = st.one_of(st.integers(-2, 200).map(str), json_texts(hostile=True))
    return st.builds(
        lambda method, user_id, query, body, sign_body, by_owner: Request(
            method, f"{UNSTABLE}/collect/{user_id}{query}", body, sign_body, by_owner
        ),
        mostly(st.just("POST"), st.sampled_from(["GET", "PUT", "DELETE"])),
        user_ids(owner),
        mostly(st.just(""), queries),
        mostly(
            st.builds(
                lambda ack, lim: json_object([*ack, *lim]).encode(),
                st.lists(st.tuples(st.just('"acknowledge"'), acknowledge), max_size=1),
                st.lists(st.tuples(st.just('"limit"'), limit), max_size=1),
            ),
            bodies,
        ),
        mostly(st.just(True), st.just(False)),
        mostly(st.just(True), st.just(False)),
    )


def relay_txn_handed_out(answer: Any) -> list[tuple[int, dict]]:
    if not answer["entries_queued"]:
        return []
    return [(answer["entry_id"], answer["transaction"])]


def batch_handed_out(answer: Any) -> list[tuple[int, dict]]:
    return [(entry["entry_id"], entry["transaction"]) for entry in answer["entries"]]


@dataclass(frozen=True)
class CollectEndpoint:
    name: str
    requests: Callable[[str], st.SearchStrategy[Request]]
    # the key naming acknowledged entries
    acknowledge: str
    handed_out: Callable[[Any], list[tuple[int, dict]]]
    examples: int


COLLECT_ENDPOINTS = [
    CollectEndpoint(
        "relay_txn", relay_txn_requests, "entry_id", relay_txn_handed_out, 120
    ),
    CollectEndpoint(
        "collect", batch_collect_requests, "acknowledge", batch_handed_out, 100
    ),
]


@pytest.mark.parametrize("endpoint", COLLECT_ENDPOINTS, ids=lambda e: e.name)
def test_collects(net: Net, endpoint: CollectEndpoint) -> None:
    """GET relay_txn/{userID} and POST unstable collect/{userID}: whatever the
    method, path, query and body, signed or not, by the owner or not, a 4xx or a
    200; an entry is gone only if a request answered 200 acknowledged it, and
    every 200 hands out entries as they were stored."""
    for n in range(5):
        txn = {"pdus": [{"n": n}], "edus": []}
        deposit_ok(net, net.alice, net.carol.server_name, f"carol-{n}", txn)
    held = entries(net, net.carol)
    assert len(held) == 5
    named: set[int] = set()

    @fuzz(endpoint.examples)
    @given(request=endpoint.requests(net.carol.server_name))
    def collect(request: Request) -> None:
        sender = net.carol if request.by_owner else net.alice
        status, value = federation(
            net,
            sender,
            request.method,
            request.uri,
            request.body,
            endpoint.name,
            request.sign_body,
        )
        if status != 200:
            return
        named.update(request.named_entry_ids(endpoint.acknowledge))
        for entry_id, transaction in endpoint.handed_out(value):
            assert held[entry_id] == transaction["transaction_id"]
            assert transaction["origin"] == net.alice.server_name

    collect()
    after = entries(net, net.carol)
    assert after.items() <= held.items()
    assert held.keys() - after.keys() <= named
    collect_all(net, net.carol)
    assert_still_serves(net)


server_names = st.one_of(st.sampled_from(SERVER_NAMES), st.text(PCHARS, max_size=12))
admin_paths = mostly(
    st.builds(lambda name: f"relays/{quote(name)}", server_names),
    st.sampled_from(
        ["queues", "status", "collect", "relays", "relays/", "registered", ""]
    ),
    st.builds(lambda name: f"relays/{quote(name)}/discover", server_names),
    st.builds(lambda s: f"relays/{s}", segments),
    st.builds(lambda s: f"relays/{s}/{s}", segments),
    segments,
).map(lambda path: f"{ADMIN}/{path}")
admin_bodies = mostly(
    st.lists(
        st.one_of(server_names.map(json_string), json_texts(hostile=True)), max_size=4
    ).map(lambda relays: json_object([('"relays"', json_array(relays))]).encode()),
    bodies,
)


def test_admin_api(net: Net) -> None:
    """The admin API, whatever the method, path, body and token: a 4xx or a
    200; afterwards each destination's relays are what was last answered 200."""
    tokens = {
        "admin": net.admin_token,
        "user": net.user_token,
        "none": None,
        "bad": "syt_not_a_token",
    }
    # destination -> the last answer 200 about its relays
    answered: dict[str, Any] = {}

    @fuzz(150)
    @given(
        method=mostly(
            st.sampled_from(["GET", "PUT", "DELETE"]),
            st.sampled_from(["POST", "PATCH"]),
        ),
        path=admin_paths,
        body=admin_bodies,
        token=mostly(st.just("admin"), st.sampled_from(["user", "none", "bad"])),
    )
    def call(method: str, path: str, body: bytes | None, token: str) -> None:
        status, value = admin(net, method, path, body, tokens[token])
        if status == 200 and path.startswith(f"{ADMIN}/relays/"):
            answered[value["destination"]] = value

    call()
    for destination, value in answered.items():
        path = f"{ADMIN}/relays/{quote(destination)}"
        assert admin(net, "GET", path, None, net.admin_token) == (200, value)
    assert_still_serves(net)


# --- the key mailbox ------------------------------------------------------------------

values = json_texts(hostile=False).map(json.loads)
local_parts = st.text(PCHARS.replace(":", ""), min_size=1, max_size=6)
device_ids = st.text(string.ascii_uppercase, min_size=1, max_size=4)


def snapshots(owner: FakeServer) -> st.SearchStrategy[dict]:
    """Snapshots of `owner`'s users, mostly signed by `owner` (their devices'
    keys are not signed: devices with `keys` are refused)."""
    snapshot = st.fixed_dictionaries(
        {
            "user_id": mostly(
                local_parts.map(lambda local: f"@{local}:{owner.server_name}"), values
            ),
            "ts": mostly(
                st.integers(0, 10**6).map(lambda ago: int(time.time() * 1000) - ago),
                values,
            ),
            "stream_id": mostly(st.integers(0, 100), values),
            "devices": mostly(
                st.lists(
                    st.fixed_dictionaries(
                        {"device_id": device_ids}, optional={"keys": values}
                    ),
                    max_size=3,
                ),
                values,
            ),
        },
        optional={
            "master_key": values,
            "self_signing_key": values,
            "fallback_keys": values,
            "display": values,
        },
    )
    return weighted(
        (3, snapshot.map(lambda s: sign_json(s, owner.server_name, owner.signing_key))),
        (1, snapshot),
    )


def key_requests(owner: FakeServer) -> st.SearchStrategy[Request]:
    server = mostly(st.just(quote(owner.server_name)), segments)
    users = local_parts.map(lambda local: f"@{local}:{owner.server_name}")
    upload = st.builds(
        lambda snapshots, one_time_keys: encode_canonical_json(
            {"snapshots": snapshots, **one_time_keys}
        ),
        st.lists(snapshots(owner), max_size=3),
        st.fixed_dictionaries({}, optional={"one_time_keys": values}),
    )
    query = st.dictionaries(users, st.lists(device_ids, max_size=2), max_size=3).map(
        lambda wanted: encode_canonical_json({"device_keys": wanted})
    )
    claim = st.dictionaries(
        users,
        st.dictionaries(device_ids, st.sampled_from(["signed_curve25519", "x"])),
        max_size=3,
    ).map(lambda wanted: encode_canonical_json({"one_time_keys": wanted}))
    endpoints = st.one_of(
        st.tuples(st.just("POST"), st.just("upload"), mostly(upload, bodies)),
        st.tuples(st.just("GET"), st.just("stock"), mostly(st.none(), bodies)),
        st.tuples(
            st.just("GET"),
            mostly(users.map(quote), segments).map(lambda u: f"user/devices/{u}"),
            mostly(st.none(), bodies),
        ),
        st.tuples(st.just("POST"), st.just("user/keys/query"), mostly(query, bodies)),
        st.tuples(st.just("POST"), st.just("user/keys/claim"), mostly(claim, bodies)),
        st.tuples(st.sampled_from(["PUT", "DELETE"]), segments, bodies),
    )
    return st.builds(
        lambda server, endpoint, method, by_owner: Request(
            endpoint[0] if method is None else method,
            f"{KEYS_PREFIX}/{server}/{endpoint[1]}",
            endpoint[2],
            True,
            by_owner,
        ),
        server,
        endpoints,
        mostly(st.none(), st.sampled_from(["GET", "POST", "PUT"])),
        mostly(st.just(True), st.just(False)),
    )


def test_key_mailbox(net: Net) -> None:
    """The key mailbox's endpoints (upload, stock, user/devices, user/keys/query
    and claim): whatever the method, path and body, by the owner or not, a 4xx or
    a 200; the relay then holds the keys of every user an upload answered 200."""
    uploaded: set[str] = set()

    @fuzz(150)
    @given(request=key_requests(net.erin))
    def call(request: Request) -> None:
        sender = net.erin if request.by_owner else net.alice
        status, _ = federation(
            net, sender, request.method, request.uri, request.body, "keys"
        )
        if status == 200 and request.uri.endswith("/upload"):
            assert request.by_owner
            content = json.loads(request.body or b"")
            uploaded.update(snapshot["user_id"] for snapshot in content["snapshots"])

    call()
    uri = f"{KEYS_PREFIX}/{quote(net.erin.server_name)}/stock"
    status, stock = federation(net, net.erin, "GET", uri, None, "check")
    assert status == 200, stock
    assert uploaded <= stock["users"].keys()
    assert_still_serves(net)


# --- relay discovery ----------------------------------------------------------------


def test_discovery_query(net: Net) -> None:
    """GET query/synapse_relay.relays, whatever the method, query and body: a 4xx
    or a 200 with this server's signed advertisement."""

    @fuzz(60)
    @given(
        method=mostly(st.just("GET"), st.sampled_from(["PUT", "POST", "DELETE"])),
        query_type=mostly(st.just(RELAYS_QUERY_TYPE), segments),
        query=queries,
        body=mostly(st.none(), bodies),
    )
    def query(method: str, query_type: str, query: str, body: bytes | None) -> None:
        uri = f"{FED}/query/{query_type}{query}"
        status, value = federation(net, net.alice, method, uri, body, "query")
        if status == 200:
            assert value["server_name"] == net.hs.server_name
            assert value["relays"] == []
            assert net.hs.server_name in value["signatures"]

    query()
    assert_still_serves(net)
