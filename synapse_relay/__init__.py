"""synapse-relay: makes a Synapse homeserver a Matrix relay server.

Add `synapse_relay.RelayModule` to `modules:` in homeserver.yaml; see README.rst.
"""

from typing import Any

from synapse.module_api import ModuleApi

from synapse_relay._synapse import background_tasks_instance
from synapse_relay.admin import (
    PREFIX,
    AdminResource,
    CollectEndpoint,
    DiscoverEndpoint,
    QueuesEndpoint,
    RegisteredEndpoint,
    RelaysEndpoint,
    RelaysListEndpoint,
    StatusEndpoint,
)
from synapse_relay.collector import start_receive_role
from synapse_relay.config import RelayModuleConfig, parse_config
from synapse_relay.directory import RelayDirectory
from synapse_relay.discovery import start_discovery
from synapse_relay.keys import start_key_deposits, start_key_fallback, start_key_mailbox
from synapse_relay.relay import start_relay_role
from synapse_relay.sender import start_send_role
from synapse_relay.store import RelayStore

__all__ = ["RelayModule"]


class RelayModule:
    """The Synapse module: starts each configured role and the admin API."""

    def __init__(self, config: RelayModuleConfig, api: ModuleApi) -> None:
        store = RelayStore(api)
        # Create or migrate the tables now rather than at the first request.
        api.run_as_background_process("synapse_relay_schema", store.ensure_schema)

        relay = start_relay_role(config.relay, store, api)
        directory = RelayDirectory(
            config.send, store, api.get_current_time_msec, api.server_name
        )
        discovery = start_discovery(
            config.receive, config.send, store, api, directory.invalidate
        )
        sender = start_send_role(config.send, directory, api, discovery.delivered)
        collector = start_receive_role(config.receive, store, api)
        mailbox = (
            start_key_mailbox(config.relay, store, api, relay.holds_mail_for)
            if relay
            else None
        )
        depositor = start_key_deposits(config.receive, api)
        key_fallback = start_key_fallback(directory, api)

        api.register_web_resource(
            PREFIX,
            AdminResource(
                api,
                [
                    QueuesEndpoint(store),
                    RelaysListEndpoint(directory),
                    RelaysEndpoint(directory, discovery, store, api, sender),
                    DiscoverEndpoint(config.send, directory, discovery, api),
                    RegisteredEndpoint(config.relay, store, api),
                    StatusEndpoint(
                        {
                            "relay": relay.stats if relay else None,
                            "push": relay.pusher.stats
                            if relay and relay.pusher
                            else None,
                            "send": sender.stats if sender else None,
                            "receive": collector.stats if collector else None,
                            "relay_keys": mailbox.stats if mailbox else None,
                            "receive_keys": depositor.stats if depositor else None,
                            "send_keys": key_fallback.stats,
                            "discovery": discovery.stats,
                        }
                    ),
                    CollectEndpoint(collector, background_tasks_instance(api)),
                ],
            ),
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> RelayModuleConfig:
        return parse_config(config)
