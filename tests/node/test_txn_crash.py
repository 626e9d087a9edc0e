"""Cross-shard atomicity and crash safety with bank transfers.

Every transfer moves money between two accounts and writes a receipt key in the same
txn (three keys, usually two or three shards). After SIGKILLs and restarts: the total
is unchanged, every acknowledged transfer's receipt exists, and the balances equal the
initial ones plus exactly the transfers whose receipts exist (no partial txn anywhere).
"""
import random
import time

import pytest

from node.router import shard_of

ACCOUNTS = 40
INITIAL = 1000


def account(i):
    return f"acct/{i:03d}".encode()


def receipt(n):
    return f"rcpt/{n:06d}".encode()


class Bank:
    def __init__(self, cluster, seed):
        self.cluster = cluster
        self.client = cluster.client()
        self.rng = random.Random(seed)
        self.transfers = {}      # receipt -> (from, to, amount)
        self.acked = set()
        self.unknown = set()
        self.next = 0
        self.client.ok("txn", writes=[[account(i), str(INITIAL).encode()] for i in range(ACCOUNTS)])

    def send_round(self, size=8):
        """One get of every account, then one batch of disjoint transfers (sent, not read)."""
        got = self.client.call("get", keys=[account(i) for i in range(ACCOUNTS)])
        if not got["ok"]:
            return None
        picks = self.rng.sample(range(ACCOUNTS), 2 * size)
        txns, names = [], []
        for src, dst in zip(picks[::2], picks[1::2]):
            bal_src, bal_dst = int(got["values"][src]), int(got["values"][dst])
            amount = self.rng.randint(1, 50)
            self.next += 1
            name = receipt(self.next)
            self.transfers[name] = (src, dst, amount)
            names.append(name)
            txns.append({"reads": [[account(src), got["versions"][src]], [account(dst), got["versions"][dst]]],
                         "writes": [[account(src), str(bal_src - amount).encode()],
                                    [account(dst), str(bal_dst + amount).encode()],
                                    [name, f"{src}>{dst}:{amount}".encode()]]})
        return names, self.client.send("batch", txns=txns)

    def read_round(self, sent, timeout=10.0):
        names, rid = sent
        try:
            while True:
                reply = self.client.recv(timeout)
                if reply["id"] == rid:
                    break
        except TimeoutError:     # reply lost (router killed): outcomes unknown
            self.unknown.update(names)
            return
        if not reply["ok"]:
            self.unknown.update(names)
            return
        for name, res in zip(names, reply["results"]):
            if res["ok"]:
                self.acked.add(name)
            elif res["error"]["code"] == "unavailable" and res["error"].get("outcome") != "aborted":
                self.unknown.add(name)

    def rounds(self, n, deadline):
        for _ in range(n):
            if time.monotonic() > deadline:
                break
            sent = self.send_round()
            if sent:
                self.read_round(sent)

    def verify(self):
        self.cluster.wait_all_shards_up()
        c = self.cluster.client()
        state = c.ok("get", keys=[account(i) for i in range(ACCOUNTS)])
        balances = [int(v) for v in state["values"]]
        assert sum(balances) == ACCOUNTS * INITIAL
        names = sorted(self.transfers)
        present = {n for n, v in zip(names, c.ok("get", keys=names)["values"]) if v is not None}
        assert self.acked <= present, "an acknowledged transfer is missing"
        assert present <= self.acked | self.unknown, "a transfer reported as failed was applied"
        expected = [INITIAL] * ACCOUNTS
        for name in present:
            src, dst, amount = self.transfers[name]
            expected[src] -= amount
            expected[dst] += amount
        assert balances == expected, "balances do not match the receipts: a partial transaction"
        assert len(self.acked) > 20
        return present


def test_reader_never_sees_part_of_a_cross_shard_txn(cluster):
    writer, reader = cluster.client(), cluster.client()
    pairs = []
    i = 0
    while len(pairs) < 4:       # x on shard 0, y on shard 1
        x, y = f"x{i}".encode(), f"y{i}".encode()
        if shard_of(x, 2) == 0 and shard_of(y, 2) == 1:
            pairs.append((x, y))
        i += 1
    keys = [k for pair in pairs for k in pair]
    for round_no in range(60):
        value = str(round_no).encode()
        writer.send("txn", writes=[[k, value] for k in keys])
        for _ in range(3):      # reads racing the cross-shard commit
            reader.send("get", keys=keys)
        assert writer.recv()["ok"]
        for _ in range(3):
            reply = reader.recv()
            assert reply["ok"], reply
            assert len(set(reply["values"])) == 1, f"torn read: {reply['values']}"
    assert writer.ok("get", keys=keys)["values"] == [b"59"] * len(keys)


def test_concurrent_conflicting_transfers_keep_the_total(cluster):
    banks = [Bank(cluster, seed) for seed in (1, 2)]
    banks[1].client.ok("txn", writes=[[account(i), str(INITIAL).encode()] for i in range(ACCOUNTS)])
    deadline = time.monotonic() + 20
    for _ in range(15):
        sent = [b.send_round() for b in banks]
        for b, s in zip(banks, sent):
            if s:
                b.read_round(s)
    state = banks[0].client.ok("get", keys=[account(i) for i in range(ACCOUNTS)])
    assert sum(int(v) for v in state["values"]) == ACCOUNTS * INITIAL
    assert time.monotonic() < deadline


@pytest.mark.slow
def test_sigkill_a_shard_mid_load_keeps_every_acknowledged_transfer(cluster):
    bank = Bank(cluster, seed=7)
    deadline = time.monotonic() + 40
    bank.rounds(10, deadline)
    sent = bank.send_round()
    cluster.kill(1)                              # transfers in flight
    bank.read_round(sent)
    bank.rounds(3, deadline)                     # the shard is down: unavailable answers
    cluster.start_shard(1)
    cluster.wait_all_shards_up()
    bank.rounds(10, deadline)
    sent = bank.send_round()
    cluster.kill(0)
    bank.read_round(sent)
    cluster.start_shard(0)
    bank.rounds(10, deadline)
    bank.verify()


@pytest.mark.slow
def test_sigkill_the_router_mid_load_resolves_in_doubt_txns(cluster):
    bank = Bank(cluster, seed=11)
    deadline = time.monotonic() + 40
    bank.rounds(10, deadline)
    for _ in range(2):
        sent = bank.send_round()
        cluster.kill("router")                   # 2PC txns in doubt
        bank.read_round(sent, timeout=0.5)
        cluster.start_router()
        bank.rounds(10, deadline)
    before = bank.client.ok("ping")["ts"]
    bank.verify()
    stats = bank.client.ok("stats")
    assert all(s["prepared"] == 0 for s in stats["shards"])
    assert before > 0


@pytest.mark.slow
def test_sigkill_the_router_right_after_it_answered_keeps_the_answered_commits(cluster):
    """The router answers a cross-shard commit at its decision, and sends the
    commit_prepared messages only at the end of that loop pass: a SIGKILL right after
    an answer can land before any participant applied the commit. Recovery must still
    commit every answered transfer (each participant holds it prepared)."""
    bank = Bank(cluster, seed=13)
    deadline = time.monotonic() + 40
    bank.rounds(5, deadline)
    for _ in range(3):
        sent = bank.send_round()
        bank.read_round(sent)
        cluster.kill("router")
        cluster.start_router()
        bank.rounds(3, deadline)
    bank.verify()
    assert all(s["prepared"] == 0 for s in bank.client.ok("stats")["shards"])
