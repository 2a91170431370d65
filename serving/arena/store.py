"""The Arena's battles and votes in a SQL database through SQLAlchemy (SQLite at a path by default).

A battle is one prompt answered by two anonymous contestants; it gets at most one vote. The
database enforces that (a unique battle id per vote), so two racing votes cannot both be stored.
Everything a battle needs for the export (prompt, both answers, contestant names) is stored, so the
leaderboard and `GET /arena/battles.jsonl` are computed from the database alone, after any restart.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid

import sqlalchemy as sa
from sqlalchemy import orm

# The four verdicts, named as in FastChat's cleaned battles.
from jvila.eval.battles import WINNERS


class ArenaError(Exception):
    """A request the Arena refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Base(orm.DeclarativeBase):
    pass


class BattleRow(_Base):
    __tablename__ = "arena_battles"

    id: orm.Mapped[str] = orm.mapped_column(sa.String(32), primary_key=True)
    created: orm.Mapped[float] = orm.mapped_column(sa.Float)
    prompt: orm.Mapped[str] = orm.mapped_column(sa.Text)
    contestant_a: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    contestant_b: orm.Mapped[str] = orm.mapped_column(sa.String(200))
    # None until that side's answer has been generated in full.
    answer_a: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    answer_b: orm.Mapped[str | None] = orm.mapped_column(sa.Text, nullable=True)
    tokens_a: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)
    tokens_b: orm.Mapped[int | None] = orm.mapped_column(sa.Integer, nullable=True)
    # Set when the answers start streaming: a battle's answers are generated once.
    started: orm.Mapped[bool] = orm.mapped_column(sa.Boolean, default=False)


class VoteRow(_Base):
    __tablename__ = "arena_votes"

    id: orm.Mapped[int] = orm.mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    battle_id: orm.Mapped[str] = orm.mapped_column(sa.ForeignKey("arena_battles.id"), unique=True)
    winner: orm.Mapped[str] = orm.mapped_column(sa.String(20))
    tstamp: orm.Mapped[float] = orm.mapped_column(sa.Float)


@dataclasses.dataclass(frozen=True)
class StoredBattle:
    id: str
    created: float
    prompt: str
    contestant_a: str
    contestant_b: str
    answer_a: str | None
    answer_b: str | None
    tokens_a: int | None
    tokens_b: int | None
    started: bool
    winner: str | None = None
    vote_tstamp: float | None = None

    @property
    def answered(self) -> bool:
        return self.answer_a is not None and self.answer_b is not None


def database_url(url_or_path: str) -> str:
    """An SQLAlchemy URL as given, or a file path turned into a SQLite URL (its folder must exist)."""
    if "://" in url_or_path:
        return url_or_path
    path = os.path.abspath(os.path.expanduser(url_or_path))
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"arena database {url_or_path!r}: the folder {os.path.dirname(path)!r} does not exist")
    return f"sqlite:///{path}"


class ArenaStore:
    """Battles and votes; every method is one short transaction (safe from any thread)."""

    def __init__(self, url_or_path: str):
        url = database_url(url_or_path)
        try:
            # SQLite connections are used from the server's worker threads, one at a time each.
            connect_args = {"check_same_thread": False} if url.startswith("sqlite") else {}
            self.engine = sa.create_engine(url, connect_args=connect_args)
            _Base.metadata.create_all(self.engine)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, sa.exc.OperationalError) as e:
            raise ValueError(f"arena database {url_or_path!r} cannot be opened: {e}") from None
        self._sessions = orm.sessionmaker(self.engine, expire_on_commit=False)
        # SQLite serialises writers anyway; one lock keeps check-then-write steps atomic on every backend.
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    def create_battle(self, prompt: str, contestant_a: str, contestant_b: str) -> StoredBattle:
        row = BattleRow(id=uuid.uuid4().hex, created=time.time(), prompt=prompt, contestant_a=contestant_a,
                        contestant_b=contestant_b, started=False)
        with self._sessions.begin() as session:
            session.add(row)
        return _stored(row, None)

    def get(self, battle_id: str) -> StoredBattle:
        with self._sessions() as session:
            row = session.get(BattleRow, battle_id)
            if row is None:
                raise ArenaError(404, f"there is no battle {battle_id!r}")
            vote = session.scalar(sa.select(VoteRow).where(VoteRow.battle_id == battle_id))
            return _stored(row, vote)

    def start(self, battle_id: str) -> StoredBattle:
        """Mark the answers as being generated; a battle's answers are streamed only once."""
        with self._lock, self._sessions.begin() as session:
            row = session.get(BattleRow, battle_id)
            if row is None:
                raise ArenaError(404, f"there is no battle {battle_id!r}")
            if row.started:
                raise ArenaError(409, f"the answers of battle {battle_id!r} have already been streamed")
            row.started = True
            return _stored(row, None)

    def release(self, battle_id: str) -> None:
        """Undo `start` when the answers could not be submitted, so that the battle can be streamed again."""
        with self._lock, self._sessions.begin() as session:
            row = session.get(BattleRow, battle_id)
            if row is not None:
                row.started = False

    def save_answer(self, battle_id: str, side: str, text: str, num_tokens: int) -> None:
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        with self._sessions.begin() as session:
            row = session.get(BattleRow, battle_id)
            setattr(row, f"answer_{side}", text)
            setattr(row, f"tokens_{side}", num_tokens)

    def vote(self, battle_id: str, winner: str) -> StoredBattle:
        """Store the one vote of a battle whose answers are complete."""
        if winner not in WINNERS:
            raise ArenaError(400, f"winner must be one of {', '.join(map(repr, WINNERS))}, got {winner!r}")
        with self._lock, self._sessions.begin() as session:
            row = session.get(BattleRow, battle_id)
            if row is None:
                raise ArenaError(404, f"there is no battle {battle_id!r}")
            if session.scalar(sa.select(VoteRow.id).where(VoteRow.battle_id == battle_id)) is not None:
                raise ArenaError(409, f"battle {battle_id!r} has already been voted on")
            if row.answer_a is None or row.answer_b is None:
                raise ArenaError(409, f"battle {battle_id!r} cannot be voted on before both answers are complete")
            vote = VoteRow(battle_id=battle_id, winner=winner, tstamp=time.time())
            session.add(vote)
            try:
                session.flush()
            except sa.exc.IntegrityError:  # another process stored a vote first (the unique battle id)
                raise ArenaError(409, f"battle {battle_id!r} has already been voted on") from None
            return _stored(row, vote)

    def voted_battles(self) -> list[StoredBattle]:
        """Every battle with a vote, oldest vote first."""
        query = sa.select(BattleRow, VoteRow).join(VoteRow, VoteRow.battle_id == BattleRow.id).order_by(
            VoteRow.tstamp, VoteRow.id)
        with self._sessions() as session:
            return [_stored(battle, vote) for battle, vote in session.execute(query)]

    def count(self) -> tuple[int, int]:
        """(battles, votes) stored."""
        with self._sessions() as session:
            return (session.scalar(sa.select(sa.func.count()).select_from(BattleRow)),
                    session.scalar(sa.select(sa.func.count()).select_from(VoteRow)))


def _stored(row: BattleRow, vote: VoteRow | None) -> StoredBattle:
    return StoredBattle(row.id, row.created, row.prompt, row.contestant_a, row.contestant_b, row.answer_a,
                        row.answer_b, row.tokens_a, row.tokens_b, bool(row.started),
                        vote.winner if vote else None, vote.tstamp if vote else None)
