"""The fake federation servers, now in the package (the benchmarks use them too):
`synapse_relay.fake_federation`."""

from synapse_relay.fake_federation import (
    KEY_ID,
    Destination,
    FakeServer,
    FakeServerFactory,
    quote,
)

__all__ = ["KEY_ID", "Destination", "FakeServer", "FakeServerFactory", "quote"]
