"""The in-flight journal: what the provisioning run in progress has achieved, durable before each next step.

``<state>/journal.json`` (0600: it holds the ownership token, a secret) is rewritten atomically at each stage:

    started     a staging directory exists (and, for CreateCertificateFromCsr, soon the key in it)
    key-ready   the device key is in the staging directory
    issued      the service issued a certificate: its id and PEM, the ownership token and its deadline
    registered  RegisterThing accepted: thing name and device configuration
    committed   the generation is stored (its number); never written, only derived: a run killed between
                its commit and the journal's removal leaves "registered" with its staging directory gone,
                and the next run finds the generation holding the journal's certificate

A run that finds a journal resumes from its stage: RegisterThing with the saved token while the token is
valid (minus a margin), else it starts over and records the abandoned certificate. The new identity
connects from the staging directory before it is committed; the journal is removed after the commit. Every
write and the removal are fsync'd, file and state directory, before they return (power loss, not only kill -9).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from fleetprov.atomicio import fsync_dir, write_atomic
from fleetprov.errors import StorageError
from fleetprov.store import CorruptState

log = logging.getLogger(__name__)

JOURNAL = "journal.json"
STAGES = ("started", "key-ready", "issued", "registered", "committed")
TOKEN_LIFETIME = 3600.0  # AWS: an ownership token expires one hour after it was issued
TOKEN_MARGIN = 300.0  # do not start a RegisterThing that could outlive the token


@dataclass(frozen=True)
class Journal:
    staging: str  # name of the staging directory under the state directory
    method: str
    key_type: str
    template: str
    endpoint: str
    stage: str = "started"
    certificate_id: Optional[str] = None
    certificate_pem: Optional[str] = None
    ownership_token: Optional[str] = field(default=None, repr=False)  # a secret
    token_deadline: Optional[float] = None  # epoch seconds, device clock
    not_after: Optional[str] = None
    key_reference: Optional[str] = None
    thing_name: Optional[str] = None
    device_configuration: Optional[Mapping[str, str]] = None
    generation: Optional[int] = None
    abandoned: tuple[str, ...] = ()  # certificates issued to this device and given up on

    def text(self, name: str) -> str:
        """A field this stage must have; CorruptState if a journal lacks it."""
        value = getattr(self, name)
        if not isinstance(value, str) or not value:
            raise CorruptState(f"the journal (stage {self.stage}) has no {name}", step="journal")
        return value

    def at(self, stage: str, **changes: Any) -> Journal:
        return replace(self, stage=stage, **changes)

    def token_usable(self, now: Optional[float] = None) -> bool:
        """True while a RegisterThing started now would finish before the token expires."""
        if self.token_deadline is None:
            return False
        return (now if now is not None else time.time()) < self.token_deadline - TOKEN_MARGIN

    def matches(self, method: str, key_type: str, template: str, endpoint: str) -> bool:
        """A journal written under another configuration is not resumed."""
        return (self.method, self.key_type, self.template, self.endpoint) == (method, key_type, template, endpoint)


def journal_path(state_dir: Path) -> Path:
    return state_dir / JOURNAL


def save_journal(state_dir: Path, journal: Journal) -> Journal:
    document = asdict(journal)
    document["abandoned"] = list(journal.abandoned)
    write_atomic(journal_path(state_dir), json.dumps(document, indent=2).encode(), mode=0o600)
    return journal


def load_journal(state_dir: Path) -> Optional[Journal]:
    """The journal of an interrupted run, or None. An unreadable journal is set aside, never trusted."""
    path = journal_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}", step="journal") from exc
    try:
        document = json.loads(data)
        document["abandoned"] = tuple(document.get("abandoned", ()))
        journal = Journal(**document)
        _check(journal)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring the unreadable journal %s (%s): starting over", path, type(exc).__name__)
        clear_journal(state_dir)
        return None
    return journal


_TEXT = ("staging", "method", "key_type", "template", "endpoint", "stage")
_OPTIONAL_TEXT = ("certificate_id", "certificate_pem", "ownership_token", "not_after", "key_reference", "thing_name")


def _check(journal: Journal) -> None:
    """Every field has the type the code relies on; raises ValueError otherwise."""
    if journal.stage not in STAGES:
        raise ValueError("stage")
    if not all(isinstance(getattr(journal, name), str) for name in _TEXT):
        raise ValueError("text field")
    if not all(isinstance(getattr(journal, name), (str, type(None))) for name in _OPTIONAL_TEXT):
        raise ValueError("optional text field")
    deadline = journal.token_deadline
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
        raise ValueError("token_deadline")
    if journal.generation is not None and (
        isinstance(journal.generation, bool) or not isinstance(journal.generation, int)
    ):
        raise ValueError("generation")
    configuration = journal.device_configuration
    if configuration is not None and not (
        isinstance(configuration, dict) and all(isinstance(v, str) for v in configuration.values())
    ):
        raise ValueError("device_configuration")
    if not all(isinstance(item, str) for item in journal.abandoned):
        raise ValueError("abandoned")
    if "/" in journal.staging or not journal.staging.startswith("staging-"):
        raise ValueError("staging")


def clear_journal(state_dir: Path) -> None:
    """Remove the journal, durably: the state directory is fsync'd before the next step (a hook, the next
    network call) can rely on the run being finished."""
    path = journal_path(state_dir)
    try:
        path.unlink()
        fsync_dir(state_dir)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot remove {path}: {exc.strerror}", step="journal") from exc
