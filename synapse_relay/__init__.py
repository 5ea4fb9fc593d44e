"""synapse-relay: makes a Synapse homeserver a Matrix relay server.

Add `synapse_relay.RelayModule` to `modules:` in homeserver.yaml; see README.rst.
"""

from typing import Any

from synapse.module_api import ModuleApi

from synapse_relay.admin import PREFIX, AdminResource, QueuesEndpoint, StatusEndpoint
from synapse_relay.config import RelayModuleConfig, parse_config
from synapse_relay.relay import start_relay_role
from synapse_relay.store import RelayStore

__all__ = ["RelayModule"]


class RelayModule:
    """The Synapse module: starts each configured role and the admin API."""

    def __init__(self, config: RelayModuleConfig, api: ModuleApi) -> None:
        store = RelayStore(api)
        # Create or migrate the tables now rather than at the first request.
        api.run_as_background_process("synapse_relay_schema", store.ensure_schema)

        relay = start_relay_role(config.relay, store, api)

        api.register_web_resource(
            PREFIX,
            AdminResource(
                api,
                [
                    QueuesEndpoint(store),
                    StatusEndpoint({"relay": relay.stats if relay else None}),
                ],
            ),
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> RelayModuleConfig:
        return parse_config(config)
