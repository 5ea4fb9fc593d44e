"""The HTTPS JSON server of the fake servers, now in the package (the benchmarks use
it too): `synapse_relay.fake_federation`."""

from synapse_relay.fake_federation import TlsJsonServer

__all__ = ["TlsJsonServer"]
