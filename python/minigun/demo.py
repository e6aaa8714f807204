"""The bundled example job (``python -m minigun demo``): an ETL over a SQLite database.

It writes a table of synthetic orders into a database file (a temporary one unless
``--db`` names it), then runs :class:`OrderETL`: a producer reads the orders back, a
threaded stage prices them, an accumulator batches them, and forked children write each
batch into a second table, every child over its own connection (opened in
``before_worker``, committed in ``after_worker``). At the end it reads back how many
rows were written: the same number as were produced, or the demo fails.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import time

import minigun as mg

REGIONS = {"north": 0.20, "south": 0.18, "east": 0.21, "west": 0.19}
CATEGORIES = {"B": "books", "G": "games", "H": "home", "T": "tools"}

SOURCE_SCHEMA = """
    DROP TABLE IF EXISTS orders;
    DROP TABLE IF EXISTS priced_orders;
    CREATE TABLE orders (
        id INTEGER PRIMARY KEY, customer INTEGER, region TEXT, sku TEXT,
        quantity INTEGER, unit_cents INTEGER
    );
    CREATE TABLE priced_orders (
        id INTEGER PRIMARY KEY, customer INTEGER, region TEXT, category TEXT,
        net_cents INTEGER, tax_cents INTEGER, gross_cents INTEGER
    );
"""


def connect(path: str) -> sqlite3.Connection:
    # One writer at a time: a child waits (up to 60 s) for the other's commit.
    return sqlite3.connect(path, timeout=60, isolation_level=None)


def create_orders(path: str, records: int, seed: int = 7) -> None:
    """(Re)create the tables and fill ``orders`` with ``records`` synthetic orders."""
    rng = random.Random(seed)
    regions, categories = list(REGIONS), list(CATEGORIES)
    conn = connect(path)
    conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer (persistent)
    conn.executescript(SOURCE_SCHEMA)
    with conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
            (
                (
                    n,
                    rng.randrange(50_000),
                    rng.choice(regions),
                    f"{rng.choice(categories)}-{rng.randrange(1000):03d}",
                    rng.randrange(1, 6),
                    rng.randrange(199, 20_000),
                )
                for n in range(records)
            ),
        )
    conn.close()


class OrderETL(mg.Task):
    """Read orders, price them on threads, write them in batches from forked children."""

    max_threads = 2
    max_processes = 2

    def __init__(self, db: str) -> None:
        self.db = db
        self.conn: sqlite3.Connection | None = None

    @mg.producer
    def orders(self) -> list[tuple[int, int, str, str, int, int]]:
        # Read everything, then close: SQLite connections must not be open in a process
        # that forks (the children's locks would be wrong), and no child forks before the
        # first order is emitted. A list has a len(), so the progress view shows a bar.
        conn = connect(self.db)
        try:
            return conn.execute("SELECT * FROM orders ORDER BY id").fetchall()
        finally:
            conn.close()

    @mg.processor(threads=2)
    def price(
        self, order: tuple[int, int, str, str, int, int]
    ) -> tuple[int, int, str, str, int, int, int]:
        order_id, customer, region, sku, quantity, unit_cents = order
        net = quantity * unit_cents
        tax = round(net * REGIONS[region])
        return order_id, customer, region, CATEGORIES[sku[0]], net, tax, net + tax

    batch = mg.accumulator("batch", max_size=5_000)

    @mg.consumer(strategy="spawn_fork")
    def save(self, rows: list[tuple[int, int, str, str, int, int, int]]) -> None:
        assert self.conn is not None
        self.conn.execute("BEGIN IMMEDIATE")  # take the write lock now, or wait for it
        self.conn.executemany("INSERT INTO priced_orders VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self.conn.execute("COMMIT")

    # Each forked child is a worker of `save`: it opens its own connection (a connection
    # must never cross a fork) and closes it before it exits.
    @mg.before_worker(stage="save")
    def open_connection(self) -> None:
        self.conn = connect(self.db)

    @mg.after_worker(stage="save")
    def close_connection(self) -> None:
        assert self.conn is not None
        self.conn.close()
        self.conn = None


def main(records: int = 300_000, db: str | None = None, progress: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="minigun-demo-") as scratch:
        path = db if db is not None else os.path.join(scratch, "orders.db")
        began = time.perf_counter()
        create_orders(path, records)
        print(
            f"minigun demo: wrote {records:,} orders into {path} in "
            f"{time.perf_counter() - began:.1f}s\n",
            flush=True,
        )
        result = OrderETL(path).run(progress=progress)
        print(result.summary())
        conn = connect(path)
        written, gross = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(gross_cents), 0) FROM priced_orders"
        ).fetchone()
        conn.close()
        print(
            f"\nrows read back from priced_orders: {written:,} of {records:,} produced "
            f"(gross revenue {gross / 100:,.2f})"
        )
        return 0 if written == records and result.ok else 1
