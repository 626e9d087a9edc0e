def test_smoke(cluster):
    c = cluster.client()
    assert c.ok("ping")["shards"] == 2
    r = c.ok("txn", writes=[[b"a", b"1"], [b"b", b"2"], [b"c", b"3"]])
    g = c.ok("get", keys=[b"a", b"b", b"c", b"zz"])
    assert g["values"] == [b"1", b"2", b"3", None]
    assert g["versions"] == [r["commit_ts"]] * 3 + [0]
