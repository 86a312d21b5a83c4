"""The device key in a PKCS#11 token, as the provisioning flow uses it: found (a factory-made key, or the key
an interrupted run made) or made in the token, and its CSR signed there, in one visit to the token.

Each identity gets a key of its own, under a label the caller chooses: keys.pkcs11.key_label for the first one
(so that a factory-made key is used), that label + ``-g<generation>`` for every later one (claim.py,
rotation.py). A run killed after making its key finds it again under the same label, so keys never pile up
in the token, whatever the number of interrupted runs. The keys of generations that are pruned are deleted
(delete_token_keys, through the key process: agent.prune_old).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import pkcs11

from fleetprov.errors import FleetprovError
from fleetprov.keys import PreparedKey, prepared
from fleetprov.keys.pkcs11 import KeyMissing, Pkcs11Key, delete_key, find_key, generate_key, open_token
from fleetprov.keys.pkcs11_settings import Pkcs11Settings
from fleetprov.keys.pkcs11_uri import parse_pkcs11_uri

log = logging.getLogger(__name__)


def prepare_token_key(
    settings: Pkcs11Settings, pin: str, key_type: str, name: str, *, fresh: bool
) -> tuple[PreparedKey, str]:
    """The key ``settings`` names, with its CSR for ``name`` (its common name as keys.csr_common_name makes
    it, as for a key file): found or made now, or with ``fresh`` always made now (what was under its label
    before is deleted: it belongs to no generation, a run that failed or was killed made it); and what was
    done, for the log of the process that asked (this runs in the key process)."""
    with open_token(settings, pin) as session:
        where = f"token {session.token.label!r}"
        replaced = delete_key(session, settings.key_label, settings.key_id) if fresh else 0
        key = None if fresh else _existing_key(session, settings)
        if key is not None:
            return prepared(key, name), f"using the key already in {where}: {key.key_reference}"
        key = generate_key(session, key_type, settings.key_label, settings.key_id)
        done = f"made a {key_type} key in {where}: {key.key_reference}"
        if replaced:
            done += f" (deleted the {replaced} object(s) a failed run had left under its label)"
        return prepared(key, name), done


def _existing_key(session: pkcs11.Session, settings: Pkcs11Settings) -> Optional[Pkcs11Key]:
    try:
        return find_key(session, settings.key_label, settings.key_id)
    except KeyMissing:
        return None


def delete_token_keys(settings: Pkcs11Settings, pin: str, key_references: Sequence[str]) -> dict[str, Optional[str]]:
    """Delete the keys (private, public, and a certificate stored beside them) that ``key_references`` name from
    the configured token: for each reference, None once it is gone (or was never there), else why not."""
    outcome: dict[str, Optional[str]] = {}
    with open_token(settings, pin) as session:
        for reference in key_references:
            try:
                uri = parse_pkcs11_uri(reference)
                if uri.token_label != session.token.label:
                    outcome[reference] = f"in token {uri.token_label!r}, not the configured {session.token.label!r}"
                    continue
                deleted = delete_key(session, uri.key_label, uri.key_id)
            except ValueError as exc:  # a reference that names no key
                outcome[reference] = f"not a usable key reference: {exc}"
            except FleetprovError as exc:
                outcome[reference] = exc.message
            else:
                log.info("deleted %s object(s) of %s from the token", deleted, reference)
                outcome[reference] = None
    return outcome
