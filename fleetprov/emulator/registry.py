"""The emulator's registry: things, certificates, policies, groups and templates, in one SQLite file.

The running emulator and the admin sub-commands (``fleetprov emulator things`` ...) open the same file;
WAL mode and a busy timeout let them do so at the same time. Ownership tokens are stored only as
SHA-256 hashes: the registry never holds a secret a device could replay.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fleetprov.errors import EmulatorError

SCHEMA_VERSION = 3  # PRAGMA user_version; bump on any schema change
# Versions this code upgrades in place: 2 added ca_certificates (a table, which _SCHEMA creates); 3 added
# thing_principals.exclusive (a column, which _add_missing_columns adds).
UPGRADABLE_VERSIONS = frozenset({1, 2})
# AttachThingPrincipal's thingPrincipalType: "EXCLUSIVE_THING - [...] The thing will be the only thing that's
# attached to the principal. NON_EXCLUSIVE_THING - [...] Multiple things can be attached to the principal."
THING_PRINCIPAL_TYPES = ("NON_EXCLUSIVE_THING", "EXCLUSIVE_THING")
CERTIFICATE_STATUSES = ("ACTIVE", "INACTIVE", "REVOKED", "PENDING_ACTIVATION")
CA_MODES = ("DEFAULT", "SNI_ONLY")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,                 -- 'claim' or 'device'
    created_at REAL NOT NULL,
    token_hash TEXT UNIQUE,
    token_expires_at REAL,
    claim_certificate_id TEXT
);
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY,
    thing_type TEXT,
    attributes TEXT NOT NULL,           -- JSON object
    billing_group TEXT,
    created_at REAL NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS thing_groups (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS thing_types (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS billing_groups (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS thing_group_members (
    thing TEXT NOT NULL, thing_group TEXT NOT NULL, PRIMARY KEY (thing, thing_group)
);
CREATE TABLE IF NOT EXISTS thing_principals (
    thing TEXT NOT NULL, certificate_id TEXT NOT NULL,
    exclusive INTEGER NOT NULL DEFAULT 0,  -- 1: attached with thingPrincipalType EXCLUSIVE_THING
    PRIMARY KEY (thing, certificate_id)
);
CREATE INDEX IF NOT EXISTS thing_principals_by_certificate ON thing_principals (certificate_id);
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policy_principals (
    policy TEXT NOT NULL, certificate_id TEXT NOT NULL, PRIMARY KEY (policy, certificate_id)
);
CREATE INDEX IF NOT EXISTS policy_principals_by_certificate ON policy_principals (certificate_id);
CREATE TABLE IF NOT EXISTS expired_tokens (   -- so that a late RegisterThing hears "expired", not "invalid"
    token_hash TEXT PRIMARY KEY, certificate_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS templates (
    name TEXT PRIMARY KEY, body TEXT NOT NULL,
    hook TEXT,                          -- JSON list of argv, or NULL
    hook_cwd TEXT                       -- directory the hook runs in
);
CREATE TABLE IF NOT EXISTS ca_certificates (  -- customer CAs, for JITP and JITR
    id TEXT PRIMARY KEY,                -- SHA-256 of the DER, as for device certificates
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    auto_registration INTEGER NOT NULL, -- 0 or 1
    template TEXT,                      -- JITP template body (JSON), or NULL for JITR
    mode TEXT NOT NULL,                 -- DEFAULT or SNI_ONLY
    activation_command TEXT,            -- run at each JITR registration event, or NULL
    created_at REAL NOT NULL
);
"""
# Columns later schema versions added to tables an older registry already has: (table, column, definition).
_ADDED_COLUMNS = (("thing_principals", "exclusive", "INTEGER NOT NULL DEFAULT 0"),)


@dataclass(frozen=True)
class ThingAttachment:
    thing: str
    exclusive: bool  # thingPrincipalType EXCLUSIVE_THING


@dataclass(frozen=True)
class CertificateRecord:
    certificate_id: str
    pem: str
    status: str
    kind: str
    created_at: float
    token_expires_at: Optional[float]
    claim_certificate_id: Optional[str]


@dataclass(frozen=True)
class ThingRecord:
    name: str
    thing_type: Optional[str]
    attributes: Mapping[str, str]
    billing_group: Optional[str]
    groups: tuple[str, ...]
    version: int


@dataclass(frozen=True)
class CaCertificateRecord:
    ca_certificate_id: str
    pem: str
    status: str
    auto_registration: bool
    template: Optional[str]  # JITP template body; None: JITR (or no auto-registration at all)
    mode: str
    activation_command: Optional[str]
    created_at: float


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    body: str
    hook: Optional[tuple[str, ...]]
    hook_cwd: Optional[str] = None


class Registry:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            has_tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
            if has_tables and version != SCHEMA_VERSION and version not in UPGRADABLE_VERSIONS:
                raise EmulatorError(
                    f"registry {path} has schema version {version}, this emulator needs {SCHEMA_VERSION}: "
                    "start with a new state directory"
                )
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise EmulatorError(f"cannot open registry {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _add_missing_columns(self) -> None:
        """Upgrade an older registry's tables in place: its rows keep their values and get the column's default."""
        for table, column, definition in _ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside happen together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, args: Sequence[Any]) -> Optional[tuple[Any, ...]]:
        row: Optional[tuple[Any, ...]] = self._db.execute(sql, args).fetchone()
        return row

    def _column(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return [row[0] for row in self._db.execute(sql, args)]

    # -- certificates --------------------------------------------------------------------------

    def add_certificate(
        self,
        certificate_id: str,
        pem: str,
        *,
        status: str,
        kind: str,
        created_at: float,
        token_hash: Optional[str] = None,
        token_expires_at: Optional[float] = None,
        claim_certificate_id: Optional[str] = None,
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO certificates VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                certificate_id,
                pem,
                status,
                kind,
                created_at,
                token_hash,
                token_expires_at,
                claim_certificate_id,
            ),
        )

    _CERT_COLUMNS = "id, pem, status, kind, created_at, token_expires_at, claim_certificate_id"

    def certificate(self, certificate_id: str) -> Optional[CertificateRecord]:
        row = self._one(f"SELECT {self._CERT_COLUMNS} FROM certificates WHERE id = ?", (certificate_id,))
        return CertificateRecord(*row) if row else None

    def certificate_by_token(self, token_hash: str) -> Optional[CertificateRecord]:
        row = self._one(f"SELECT {self._CERT_COLUMNS} FROM certificates WHERE token_hash = ?", (token_hash,))
        return CertificateRecord(*row) if row else None

    def expired_token_certificate(self, token_hash: str) -> Optional[str]:
        """The id of the certificate deleted because this token expired unused, if that happened."""
        row = self._one("SELECT certificate_id FROM expired_tokens WHERE token_hash = ?", (token_hash,))
        return str(row[0]) if row else None

    def certificates(self) -> list[CertificateRecord]:
        rows = self._db.execute(f"SELECT {self._CERT_COLUMNS} FROM certificates ORDER BY created_at")
        return [CertificateRecord(*row) for row in rows]

    def set_certificate_status(self, certificate_id: str, status: str) -> None:
        if status not in CERTIFICATE_STATUSES:
            raise EmulatorError(f"unknown certificate status {status!r} (one of {', '.join(CERTIFICATE_STATUSES)})")
        cursor = self._db.execute("UPDATE certificates SET status = ? WHERE id = ?", (status, certificate_id))
        if cursor.rowcount == 0:
            raise EmulatorError(f"no certificate with id {certificate_id}")

    def delete_expired_pending(self, now: float) -> list[str]:
        """Delete certificates whose ownership token expired before RegisterThing activated them."""
        with self.transaction():
            expired = self._column(
                "SELECT id FROM certificates WHERE status = 'PENDING_ACTIVATION' AND token_expires_at < ?",
                (now,),
            )
            for certificate_id in expired:
                self._db.execute(
                    "INSERT OR IGNORE INTO expired_tokens SELECT token_hash, id FROM certificates WHERE id = ?",
                    (certificate_id,),
                )
                self._db.execute("DELETE FROM certificates WHERE id = ?", (certificate_id,))
                self._db.execute("DELETE FROM policy_principals WHERE certificate_id = ?", (certificate_id,))
                self._db.execute("DELETE FROM thing_principals WHERE certificate_id = ?", (certificate_id,))
        return expired

    # -- things and groups ---------------------------------------------------------------------

    def thing(self, name: str) -> Optional[ThingRecord]:
        row = self._one(
            "SELECT name, thing_type, attributes, billing_group, version FROM things WHERE name = ?", (name,)
        )
        if row is None:
            return None
        groups = tuple(self._column("SELECT thing_group FROM thing_group_members WHERE thing = ? ORDER BY 1", (name,)))
        return ThingRecord(
            name=row[0],
            thing_type=row[1],
            attributes=json.loads(row[2]),
            billing_group=row[3],
            groups=groups,
            version=row[4],
        )

    def things(self) -> list[ThingRecord]:
        return [thing for name in self._column("SELECT name FROM things ORDER BY name") if (thing := self.thing(name))]

    def put_thing(
        self,
        name: str,
        *,
        thing_type: Optional[str],
        attributes: Mapping[str, str],
        billing_group: Optional[str],
        groups: Sequence[str],
        now: float,
    ) -> None:
        existing = self.thing(name)
        version = existing.version + 1 if existing else 1
        created_at = self._one("SELECT created_at FROM things WHERE name = ?", (name,))
        self._db.execute(
            "INSERT OR REPLACE INTO things VALUES (?, ?, ?, ?, ?, ?)",
            (
                name,
                thing_type,
                json.dumps(dict(attributes), sort_keys=True),
                billing_group,
                created_at[0] if created_at else now,
                version,
            ),
        )
        self._db.execute("DELETE FROM thing_group_members WHERE thing = ?", (name,))
        self._db.executemany("INSERT INTO thing_group_members VALUES (?, ?)", [(name, group) for group in groups])

    def add_named(self, kind: str, names: Sequence[str]) -> None:
        """Create thing groups, thing types or billing groups (kind: the table name)."""
        if kind not in ("thing_groups", "thing_types", "billing_groups"):
            raise ValueError(kind)
        self._db.executemany(f"INSERT OR IGNORE INTO {kind} VALUES (?)", [(name,) for name in names])

    def named_exists(self, kind: str, name: str) -> bool:
        if kind not in ("thing_groups", "thing_types", "billing_groups"):
            raise ValueError(kind)
        return self._one(f"SELECT 1 FROM {kind} WHERE name = ?", (name,)) is not None

    def attach_thing_principal(
        self, thing: str, certificate_id: str, principal_type: str = "NON_EXCLUSIVE_THING"
    ) -> None:
        """AttachThingPrincipal; attaching again sets the attachment's type.

        An exclusive attachment is the certificate's only one: attaching exclusively while another thing is
        attached, or attaching another thing while one is attached exclusively, raises EmulatorError.
        """
        if principal_type not in THING_PRINCIPAL_TYPES:
            raise EmulatorError(
                f"unknown thingPrincipalType {principal_type!r} (one of {', '.join(THING_PRINCIPAL_TYPES)})"
            )
        exclusive = principal_type == "EXCLUSIVE_THING"
        # The check and the write in one transaction (RegisterThing already runs inside one).
        with contextlib.nullcontext() if self._db.in_transaction else self.transaction():
            others = [a for a in self.thing_attachments(certificate_id) if a.thing != thing]
            if others and (exclusive or any(a.exclusive for a in others)):
                names = ", ".join(a.thing for a in others)
                raise EmulatorError(
                    f"certificate {certificate_id} is attached to {names}: an EXCLUSIVE_THING attachment "
                    "must be the certificate's only thing"
                )
            self._db.execute(
                "INSERT OR REPLACE INTO thing_principals (thing, certificate_id, exclusive) VALUES (?, ?, ?)",
                (thing, certificate_id, int(exclusive)),
            )

    def thing_attachments(self, certificate_id: str) -> list[ThingAttachment]:
        rows = self._db.execute(
            "SELECT thing, exclusive FROM thing_principals WHERE certificate_id = ? ORDER BY thing", (certificate_id,)
        )
        return [ThingAttachment(thing=str(thing), exclusive=bool(exclusive)) for thing, exclusive in rows]

    def things_for_certificate(self, certificate_id: str) -> list[str]:
        return [attachment.thing for attachment in self.thing_attachments(certificate_id)]

    def principals_of_thing(self, thing: str) -> list[str]:
        return self._column("SELECT certificate_id FROM thing_principals WHERE thing = ? ORDER BY 1", (thing,))

    # -- policies ------------------------------------------------------------------------------

    def policy_document(self, name: str) -> Optional[str]:
        row = self._one("SELECT document FROM policies WHERE name = ?", (name,))
        return str(row[0]) if row else None

    def put_policy(self, name: str, document: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)", (name, document))

    def attach_policy(self, policy: str, certificate_id: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO policy_principals VALUES (?, ?)", (policy, certificate_id))

    def policies_for_certificate(self, certificate_id: str) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT p.name, p.document FROM policies p JOIN policy_principals pp ON pp.policy = p.name "
            "WHERE pp.certificate_id = ? ORDER BY p.name",
            (certificate_id,),
        )
        return [(str(name), str(document)) for name, document in rows]

    # -- templates -----------------------------------------------------------------------------

    def put_template(self, name: str, body: str, hook: Optional[Sequence[str]], hook_cwd: Optional[str] = None) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO templates VALUES (?, ?, ?, ?)",
            (name, body, json.dumps(list(hook)) if hook else None, hook_cwd),
        )

    def set_template_hook(self, name: str, hook: Sequence[str], hook_cwd: Optional[str] = None) -> None:
        cursor = self._db.execute(
            "UPDATE templates SET hook = ?, hook_cwd = ? WHERE name = ?", (json.dumps(list(hook)), hook_cwd, name)
        )
        if cursor.rowcount == 0:
            raise EmulatorError(f"--hook {name}=...: no template named {name!r}")

    def template(self, name: str) -> Optional[TemplateRecord]:
        row = self._one("SELECT name, body, hook, hook_cwd FROM templates WHERE name = ?", (name,))
        if row is None:
            return None
        hook = tuple(json.loads(row[2])) if row[2] else None
        return TemplateRecord(name=row[0], body=row[1], hook=hook, hook_cwd=row[3])

    def template_names(self) -> list[str]:
        return self._column("SELECT name FROM templates ORDER BY name")

    # -- customer CA certificates --------------------------------------------------------------

    _CA_COLUMNS = "id, pem, status, auto_registration, template, mode, activation_command, created_at"

    def put_ca_certificate(self, record: CaCertificateRecord) -> None:
        """Register a CA, or change its settings (keeping when it was first registered)."""
        if record.mode not in CA_MODES:
            raise ValueError(record.mode)
        first = self._one("SELECT created_at FROM ca_certificates WHERE id = ?", (record.ca_certificate_id,))
        self._db.execute(
            f"INSERT OR REPLACE INTO ca_certificates ({self._CA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.ca_certificate_id,
                record.pem,
                record.status,
                int(record.auto_registration),
                record.template,
                record.mode,
                record.activation_command,
                first[0] if first else record.created_at,
            ),
        )

    def ca_certificate(self, ca_certificate_id: str) -> Optional[CaCertificateRecord]:
        row = self._one(f"SELECT {self._CA_COLUMNS} FROM ca_certificates WHERE id = ?", (ca_certificate_id,))
        return _ca_record(row) if row else None

    def ca_certificates(self) -> list[CaCertificateRecord]:
        rows = self._db.execute(f"SELECT {self._CA_COLUMNS} FROM ca_certificates ORDER BY created_at, id")
        return [_ca_record(row) for row in rows]

    def ca_certificate_ids(self) -> frozenset[str]:
        """Cheap enough to ask at every TLS handshake (a few rows at most)."""
        return frozenset(self._column("SELECT id FROM ca_certificates"))


def _ca_record(row: tuple[Any, ...]) -> CaCertificateRecord:
    return CaCertificateRecord(
        ca_certificate_id=row[0],
        pem=row[1],
        status=row[2],
        auto_registration=bool(row[3]),
        template=row[4],
        mode=row[5],
        activation_command=row[6],
        created_at=row[7],
    )
