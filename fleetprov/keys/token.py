"""The device key in a PKCS#11 token, as the provisioning flow uses it: found (a factory-made key, or the key
an interrupted run made) or made in the token, and its CSR signed there, in one visit to the token.

The key has a fixed label (keys.pkcs11.key_label), so a run killed after making it finds it again: keys never
pile up in the token, whatever the number of interrupted runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fleetprov.keys import PreparedKey, prepared
from fleetprov.keys.pkcs11 import KeyMissing, find_key, generate_key, open_token
from fleetprov.keys.pkcs11_settings import Pkcs11Settings, read_pin

log = logging.getLogger(__name__)


def prepare_token_key(
    settings: Pkcs11Settings, environ: Mapping[str, str], key_type: str, common_name: str
) -> PreparedKey:
    with open_token(settings, read_pin(settings, environ)) as session:
        where = f"token {session.token.label!r}"
        try:
            key = find_key(session, settings.key_label, settings.key_id)
            log.info("using the key already in %s: %s", where, key.key_reference)
        except KeyMissing:
            key = generate_key(session, key_type, settings.key_label, settings.key_id)
            log.info("made a %s key in %s: %s", key_type, where, key.key_reference)
        return prepared(key, common_name)
