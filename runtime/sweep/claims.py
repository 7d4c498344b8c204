"""One driver per member: a member is claimed in the run database before it starts, so two drivers of the same sweep
(a rerun while the first still runs, or two terminals) never start it twice. The drivers read the recorded runs once
at start; a claim covers the seconds between deciding to start a member and its run being recorded, and the whole
time it runs.

A claim is a row of `memspec_sweep_claims` (sweep name, member, owning sweep invocation, heartbeat). Taking one is an
INSERT that the primary key makes atomic on SQLite and PostgreSQL alike; a claim whose owner stopped beating (a
driver killed with kill -9) is taken over by a compare-and-set UPDATE after database.STALE_AFTER. The owner beats
while it waits on its members and deletes the row when the member ended. MongoDB run databases have no claims (the
driver says so)."""
from __future__ import annotations

import datetime as dt
import hashlib
import json

import sqlalchemy as sa

from store import database

BEAT_EVERY = 10  # seconds between the owner's heartbeats; STALE_AFTER is six of them

CLAIMS = sa.Table(
    'memspec_sweep_claims', sa.MetaData(),
    sa.Column('sweep', sa.String(128), primary_key=True),  # Sweep.name
    sa.Column('member', sa.String(64), primary_key=True),  # sha256 of (trial, seed, grid)
    sa.Column('owner', sa.String(160), nullable=False),  # the sweep id of the driver that holds it
    sa.Column('beat', sa.DateTime, nullable=False),  # UTC, naive (as Sacred's heartbeats)
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def member_key(identity: tuple) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:64]


class Claims:
    """The claims of one driver (`owner`: its sweep id) on the members of the sweep `name` in the database `url`."""

    def __init__(self, url: str, name: str, owner: str):
        self.name, self.owner, self.held = name, owner, set()
        self.engine = None if url.startswith(('mongodb://', 'mongodb+srv://')) else database.make_engine(url)
        if self.engine is not None:
            from runtime.record import _retry  # (imports Sacred: only where claims are taken)
            # drivers starting together on a new database: the check and the CREATE share a transaction, which on
            # SQLite fails at once ('database is locked', no busy wait) when another process wrote in between
            _retry(lambda: CLAIMS.create(self.engine, checkfirst=True))

    @property
    def supported(self) -> bool:
        return self.engine is not None

    def _where(self, key: str):
        return (CLAIMS.c.sweep == self.name) & (CLAIMS.c.member == key)

    def take(self, identity: tuple) -> str | None:
        """Claim a member for this driver. -> None when it is ours now, else the sweep id that holds it."""
        if self.engine is None:
            return None
        key = member_key(identity)
        for _ in range(3):  # a claim released or taken over between our statements: look again
            try:
                with self.engine.begin() as conn:
                    conn.execute(CLAIMS.insert().values(sweep=self.name, member=key, owner=self.owner, beat=_now()))
                self.held.add(key)
                return None
            except sa.exc.IntegrityError:
                pass
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(CLAIMS.c.owner, CLAIMS.c.beat).where(self._where(key))).first()
            if row is None:
                continue
            if row.owner == self.owner:
                self.held.add(key)
                return None
            if _now() - row.beat < database.STALE_AFTER:
                return row.owner
            # a transaction of its own: on SQLite a read transaction that turns into a write fails at once (no busy
            # wait) when another driver wrote since it read; the compare-and-set keeps the takeover atomic anyway
            with self.engine.begin() as conn:
                taken = conn.execute(CLAIMS.update().where(self._where(key) & (CLAIMS.c.owner == row.owner)
                                                           & (CLAIMS.c.beat == row.beat))
                                     .values(owner=self.owner, beat=_now())).rowcount
            if taken == 1:
                self.held.add(key)
                return None
        return 'another driver'

    def release(self, identity: tuple) -> None:
        key = member_key(identity)
        if self.engine is None or key not in self.held:
            return
        with self.engine.begin() as conn:
            conn.execute(CLAIMS.delete().where(self._where(key) & (CLAIMS.c.owner == self.owner)))
        self.held.discard(key)

    def beat(self) -> None:
        """Tell other drivers that this one is alive and still holds its claims."""
        if self.engine is not None and self.held:
            with self.engine.begin() as conn:
                conn.execute(CLAIMS.update().where((CLAIMS.c.sweep == self.name) & (CLAIMS.c.owner == self.owner))
                             .values(beat=_now()))

    def close(self) -> None:
        """Release every claim still held (the driver stops: its members ended or were interrupted)."""
        if self.engine is None:
            return
        if self.held:
            with self.engine.begin() as conn:
                conn.execute(CLAIMS.delete().where((CLAIMS.c.sweep == self.name) & (CLAIMS.c.owner == self.owner)))
            self.held.clear()
        self.engine.dispose()
