/* node._routing: which shard each key of a request goes to, in C (optional; node/routing.py
 * holds the Python reference and falls back to it).
 *
 * Why compiled: on the bench's transfer round (a `get` of 200 keys, then a `batch` of 100
 * transfers) on 2 shards, hashing every key with zlib.crc32 and sorting keys and txns
 * into shards was about a fifth of the router's CPU (1.9 us per transfer against ~9.5 us
 * for all of the router's work, measured in process). The same results as the Python
 * reference, which tests/node/test_routing.py holds this module to.
 *
 *   route_batch(txns, nshards) -> [route, ...] | None
 *       route = the shard of every key of the txn (-1 when it has none), or
 *               {shard: (reads, writes)} with the txn's pairs split by shard
 *       None  = some key is read or written by two different entries
 *   group_keys(keys, nshards) -> {shard: ([index, ...], [key, ...])}
 *   first_locked(txns, start, locked) -> index of the first entry from `start` with a
 *       read or write key in the dict `locked`, or -1
 *   lock_parts(locked, written, parts, txn)   locked[key] = txn for every key of parts,
 *       written[key] = txn for every written one
 *   unlock_parts(locked, written, parts)      the keys of parts out of both
 *       (parts = {shard: (reads, writes)}: the keys of an undecided 2PC txn; see
 *       node/coordinator.py; in Python that bookkeeping was ~0.8 us per transfer)
 *
 * Keys are exact bytes and pairs are 2-tuples or 2-lists (what node.protocol produces);
 * anything else raises TypeError (the router never passes it: the parser checked it).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *S_READS, *S_WRITES;
static uint32_t CRC_TABLE[256];

/* zlib.crc32 (CRC-32, reflected polynomial 0xEDB88320). */
static uint32_t
crc32_of(const unsigned char *p, Py_ssize_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n-- > 0)
        c = CRC_TABLE[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* The key of a pair (borrowed), or NULL with TypeError set. */
static PyObject *
pair_key(PyObject *pair)
{
    PyObject *key = NULL;
    if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2)
        key = PyTuple_GET_ITEM(pair, 0);
    else if (PyList_CheckExact(pair) && PyList_GET_SIZE(pair) == 2)
        key = PyList_GET_ITEM(pair, 0);
    if (key == NULL || !PyBytes_CheckExact(key)) {
        PyErr_SetString(PyExc_TypeError, "a pair must be (bytes key, value)");
        return NULL;
    }
    return key;
}

static long
shard_of(PyObject *key, long nshards)
{
    uint64_t crc = crc32_of((const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    return (long)(crc % (uint64_t)nshards);     /* nshards >= 1, checked by the callers */
}

/* The list under `name` in a txn dict (borrowed), or NULL with TypeError set. */
static PyObject *
pairs_of(PyObject *txn, PyObject *name)
{
    PyObject *pairs;
    if (!PyDict_CheckExact(txn)) {
        PyErr_SetString(PyExc_TypeError, "a txn must be a dict");
        return NULL;
    }
    pairs = PyDict_GetItemWithError(txn, name);
    if (pairs == NULL || !PyList_CheckExact(pairs)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a txn's reads and writes must be lists");
        return NULL;
    }
    return pairs;
}

/* Append pair to parts[shard][side], creating ([], []) for a new shard. 0, or -1 on error. */
static int
add_to_part(PyObject *parts, long shard, int side, PyObject *pair)
{
    PyObject *s = PyLong_FromLong(shard), *part;
    int rc = -1;
    if (s == NULL)
        return -1;
    part = PyDict_GetItemWithError(parts, s);                          /* borrowed */
    if (part == NULL) {
        PyObject *r, *w;
        if (PyErr_Occurred())
            goto done;
        r = PyList_New(0);
        w = PyList_New(0);
        part = (r && w) ? PyTuple_Pack(2, r, w) : NULL;
        Py_XDECREF(r);
        Py_XDECREF(w);
        if (part == NULL)
            goto done;
        if (PyDict_SetItem(parts, s, part) < 0) {
            Py_DECREF(part);
            goto done;
        }
        Py_DECREF(part);                                  /* the dict holds it */
    }
    rc = PyList_Append(PyTuple_GET_ITEM(part, side), pair);
done:
    Py_DECREF(s);
    return rc;
}

/* {shard: (reads, writes)} of a txn whose keys are on several shards; NULL on error. */
static PyObject *
split_parts(PyObject *reads, PyObject *writes, long nshards)
{
    PyObject *parts = PyDict_New(), *lists[2] = {reads, writes};
    int side;
    if (parts == NULL)
        return NULL;
    for (side = 0; side < 2; side++) {
        Py_ssize_t i, n = PyList_GET_SIZE(lists[side]);
        for (i = 0; i < n; i++) {
            PyObject *pair = PyList_GET_ITEM(lists[side], i), *key = pair_key(pair);
            if (key == NULL || add_to_part(parts, shard_of(key, nshards), side, pair) < 0) {
                Py_DECREF(parts);
                return NULL;
            }
        }
    }
    return parts;
}

/* Note every key of entry `index` in `first` (key -> entry); 1 when a key was already
 * there for another entry, 0 when not, -1 on error. */
static int
note_keys(PyObject *first, PyObject *pairs, PyObject *index)
{
    Py_ssize_t i, n = PyList_GET_SIZE(pairs);
    for (i = 0; i < n; i++) {
        PyObject *key = pair_key(PyList_GET_ITEM(pairs, i)), *seen;
        if (key == NULL)
            return -1;
        seen = PyDict_SetDefault(first, key, index);                   /* borrowed */
        if (seen == NULL)
            return -1;
        if (seen != index)
            return 1;
    }
    return 0;
}

static PyObject *
route_batch(PyObject *self, PyObject *args)
{
    PyObject *txns, *first = NULL, *routes = NULL;
    long nshards;
    Py_ssize_t n, i;
    if (!PyArg_ParseTuple(args, "O!l", &PyList_Type, &txns, &nshards))
        return NULL;
    if (nshards < 1) {
        PyErr_SetString(PyExc_ValueError, "nshards must be >= 1");
        return NULL;
    }
    n = PyList_GET_SIZE(txns);
    first = PyDict_New();
    routes = PyList_New(n);
    if (first == NULL || routes == NULL)
        goto error;
    for (i = 0; i < n; i++) {
        PyObject *txn = PyList_GET_ITEM(txns, i), *reads, *writes, *index, *route;
        PyObject *lists[2];
        long shard = -1;
        int side, single = 1, shared;
        reads = pairs_of(txn, S_READS);
        writes = reads ? pairs_of(txn, S_WRITES) : NULL;
        if (writes == NULL)
            goto error;
        /* One object per entry, stored for each of its keys: identity tells entries
         * apart (an entry's object stays alive while `first` holds its keys). */
        index = PyLong_FromSsize_t(i);
        if (index == NULL)
            goto error;
        shared = note_keys(first, reads, index);
        if (shared == 0)
            shared = note_keys(first, writes, index);
        Py_DECREF(index);              /* `first` holds its own references */
        if (shared < 0)
            goto error;
        if (shared) {
            Py_DECREF(first);
            Py_DECREF(routes);
            Py_RETURN_NONE;
        }
        lists[0] = reads;
        lists[1] = writes;
        for (side = 0; side < 2 && single; side++) {
            Py_ssize_t j, m = PyList_GET_SIZE(lists[side]);
            for (j = 0; j < m; j++) {
                /* note_keys checked every pair: pair_key cannot fail here */
                long s = shard_of(pair_key(PyList_GET_ITEM(lists[side], j)), nshards);
                if (shard < 0)
                    shard = s;
                else if (s != shard) {
                    single = 0;
                    break;
                }
            }
        }
        route = single ? PyLong_FromLong(shard) : split_parts(reads, writes, nshards);
        if (route == NULL)
            goto error;
        PyList_SET_ITEM(routes, i, route);
    }
    Py_DECREF(first);
    return routes;
error:
    Py_XDECREF(first);
    Py_XDECREF(routes);
    return NULL;
}

static PyObject *
group_keys(PyObject *self, PyObject *args)
{
    PyObject *keys, *groups;
    long nshards;
    Py_ssize_t n, i;
    if (!PyArg_ParseTuple(args, "O!l", &PyList_Type, &keys, &nshards))
        return NULL;
    if (nshards < 1) {
        PyErr_SetString(PyExc_ValueError, "nshards must be >= 1");
        return NULL;
    }
    groups = PyDict_New();
    if (groups == NULL)
        return NULL;
    n = PyList_GET_SIZE(keys);
    for (i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *idx;
        long shard;
        if (!PyBytes_CheckExact(key)) {
            PyErr_SetString(PyExc_TypeError, "keys must be bytes");
            goto error;
        }
        idx = PyLong_FromSsize_t(i);
        if (idx == NULL)
            goto error;
        shard = shard_of(key, nshards);
        /* the (indices, keys) part of a shard is the same shape as a txn's (reads, writes) */
        if (add_to_part(groups, shard, 0, idx) < 0 || add_to_part(groups, shard, 1, key) < 0) {
            Py_DECREF(idx);
            goto error;
        }
        Py_DECREF(idx);
    }
    return groups;
error:
    Py_DECREF(groups);
    return NULL;
}

/* 1 when some key of `pairs` is in `locked`, 0 when none, -1 on error. */
static int
any_key_in(PyObject *pairs, PyObject *locked)
{
    Py_ssize_t i, n = PyList_GET_SIZE(pairs);
    for (i = 0; i < n; i++) {
        PyObject *key = pair_key(PyList_GET_ITEM(pairs, i));
        int found;
        if (key == NULL)
            return -1;
        found = PyDict_Contains(locked, key);
        if (found != 0)
            return found;
    }
    return 0;
}

static PyObject *
first_locked(PyObject *self, PyObject *args)
{
    PyObject *txns, *locked;
    Py_ssize_t start, i, n;
    if (!PyArg_ParseTuple(args, "O!nO!", &PyList_Type, &txns, &start, &PyDict_Type, &locked))
        return NULL;
    n = PyList_GET_SIZE(txns);
    for (i = start < 0 ? 0 : start; i < n; i++) {
        PyObject *txn = PyList_GET_ITEM(txns, i), *reads, *writes;
        int found;
        reads = pairs_of(txn, S_READS);
        writes = reads ? pairs_of(txn, S_WRITES) : NULL;
        if (writes == NULL)
            return NULL;
        found = any_key_in(reads, locked);
        if (found == 0)
            found = any_key_in(writes, locked);
        if (found < 0)
            return NULL;
        if (found)
            return PyLong_FromSsize_t(i);
    }
    return PyLong_FromLong(-1);
}

/* Every (reads, writes) list of the {shard: (reads, writes)} dict `parts`, one at a
 * time: fn(pairs, locked, txn), and for the writes fn(pairs, written, txn) too (written
 * may be NULL); 0, or -1 on error. */
static int
each_part_list(PyObject *parts, int (*fn)(PyObject *, PyObject *, PyObject *),
               PyObject *locked, PyObject *written, PyObject *txn)
{
    Py_ssize_t pos = 0;
    PyObject *shard, *part;
    if (!PyDict_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "parts must be a dict {shard: (reads, writes)}");
        return -1;
    }
    while (PyDict_Next(parts, &pos, &shard, &part)) {
        int side;
        if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 2) {
            PyErr_SetString(PyExc_TypeError, "a part must be a (reads, writes) tuple");
            return -1;
        }
        for (side = 0; side < 2; side++) {
            PyObject *pairs = PyTuple_GET_ITEM(part, side);
            if (!PyList_CheckExact(pairs)) {
                PyErr_SetString(PyExc_TypeError, "reads and writes must be lists");
                return -1;
            }
            if (fn(pairs, locked, txn) < 0)
                return -1;
            if (side == 1 && written != NULL && fn(pairs, written, txn) < 0)
                return -1;
        }
    }
    return 0;
}

static int
lock_list(PyObject *pairs, PyObject *locked, PyObject *txn)
{
    Py_ssize_t i, n = PyList_GET_SIZE(pairs);
    for (i = 0; i < n; i++) {
        PyObject *key = pair_key(PyList_GET_ITEM(pairs, i));
        if (key == NULL || PyDict_SetItem(locked, key, txn) < 0)
            return -1;
    }
    return 0;
}

static int
unlock_list(PyObject *pairs, PyObject *locked, PyObject *unused)
{
    Py_ssize_t i, n = PyList_GET_SIZE(pairs);
    for (i = 0; i < n; i++) {
        PyObject *key = pair_key(PyList_GET_ITEM(pairs, i));
        if (key == NULL)
            return -1;
        /* A key both read and written is gone already. Looked up first: a KeyError raised
         * and cleared costs several times the lookup. */
        if (PyDict_GetItemWithError(locked, key) != NULL) {
            if (PyDict_DelItem(locked, key) < 0)
                return -1;
        }
        else if (PyErr_Occurred())
            return -1;
    }
    return 0;
}

static PyObject *
lock_parts(PyObject *self, PyObject *args)
{
    PyObject *locked, *written, *parts, *txn;
    if (!PyArg_ParseTuple(args, "O!O!OO", &PyDict_Type, &locked, &PyDict_Type, &written, &parts, &txn))
        return NULL;
    if (each_part_list(parts, lock_list, locked, written, txn) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
unlock_parts(PyObject *self, PyObject *args)
{
    PyObject *locked, *written, *parts;
    if (!PyArg_ParseTuple(args, "O!O!O", &PyDict_Type, &locked, &PyDict_Type, &written, &parts))
        return NULL;
    if (each_part_list(parts, unlock_list, locked, written, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"route_batch", route_batch, METH_VARARGS,
     "route_batch(txns, nshards) -> [shard | {shard: (reads, writes)}, ...] | None"},
    {"group_keys", group_keys, METH_VARARGS,
     "group_keys(keys, nshards) -> {shard: ([index, ...], [key, ...])}"},
    {"first_locked", first_locked, METH_VARARGS,
     "first_locked(txns, start, locked) -> index of the first txn from start with a key in locked, or -1"},
    {"lock_parts", lock_parts, METH_VARARGS,
     "lock_parts(locked, written, parts, txn): every key of parts -> txn (written: the written keys)"},
    {"unlock_parts", unlock_parts, METH_VARARGS,
     "unlock_parts(locked, written, parts): remove every key of parts from both"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_routing", "Key to shard routing (see node/routing.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__routing(void)
{
    uint32_t i, j, c;
    for (i = 0; i < 256; i++) {
        c = i;
        for (j = 0; j < 8; j++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        CRC_TABLE[i] = c;
    }
    S_READS = PyUnicode_InternFromString("reads");
    S_WRITES = PyUnicode_InternFromString("writes");
    if (!S_READS || !S_WRITES)
        return NULL;
    return PyModule_Create(&module);
}
