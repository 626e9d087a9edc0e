/* shard._rowcodec: the flush's row encoder in C (optional; shard/flush.py falls back to
 * python_encode_rows when this is not built).
 *
 * Why compiled: the profile of a flush put ~55% of its time in turning (key, chain)
 * pairs into version keys and value rows, one Python loop iteration per row; C-level
 * map/itemgetter pipelines measured no faster (see python_encode_rows). Here each row
 * costs two allocations and two memcpy's.
 *
 * encode_rows(items, cached=None, max_rows=-1) -> (taken, vkeys, values, nbytes), exactly
 * as shard.flush.python_encode_rows:
 *   items   iterable of (key: bytes, chain: list of (ts: int, value: bytes | None));
 *           consumed up to the first key after which max_rows rows (when >= 0) are built
 *   cached  the row cache's dict (an OrderedDict) or None: a key present there gets its
 *           newest (ts, value) tuple; its position (LRU order) does not change.
 *   vkeys   memcomparable(key) + be64(2**64 - 1 - ts)   (shard/keycodec.py)
 *   values  b"\x00" for a tombstone, else b"\x01" + value
 *   nbytes  the total length of vkeys and values (the flush's byte count, for free here)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *TOMBSTONE;   /* b"\x00", shared by every tombstone row */

/* Write the memcomparable encoding of key (0x00 -> 0x00 0xFF, then 0x00 0x01) to out. */
static Py_ssize_t
escape_key(const char *key, Py_ssize_t len, char *out)
{
    Py_ssize_t n = 0;
    const char *p = key, *end = key + len;
    while (p < end) {
        const char *zero = memchr(p, 0, (size_t)(end - p));
        if (zero == NULL) {
            memcpy(out + n, p, (size_t)(end - p));
            n += end - p;
            break;
        }
        memcpy(out + n, p, (size_t)(zero - p));
        n += zero - p;
        out[n++] = 0x00;
        out[n++] = (char)0xFF;
        p = zero + 1;
    }
    out[n++] = 0x00;
    out[n++] = 0x01;
    return n;
}

static Py_ssize_t
count_zeros(const char *key, Py_ssize_t len)
{
    Py_ssize_t zeros = 0;
    const char *p = key, *end = key + len;
    while (p < end && (p = memchr(p, 0, (size_t)(end - p))) != NULL) {
        zeros++;
        p++;
    }
    return zeros;
}

static int
append_rows(PyObject *key, PyObject *chain, PyObject *vkeys, PyObject *values,
            Py_ssize_t *nbytes)
{
    char stack_prefix[512];
    char *prefix = stack_prefix;
    const char *k = PyBytes_AS_STRING(key);
    Py_ssize_t klen = PyBytes_GET_SIZE(key);
    Py_ssize_t need = klen + count_zeros(k, klen) + 2;
    int rc = -1;

    if (need > (Py_ssize_t)sizeof(stack_prefix)) {
        prefix = PyMem_Malloc((size_t)need);
        if (prefix == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_ssize_t plen = escape_key(k, klen, prefix);

    Py_ssize_t n = PyList_GET_SIZE(chain);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *version = PyList_GET_ITEM(chain, i);
        if (!PyTuple_Check(version) || PyTuple_GET_SIZE(version) != 2) {
            PyErr_SetString(PyExc_TypeError, "a chain entry must be a (ts, value) tuple");
            goto done;
        }
        unsigned long long ts = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(version, 0));
        if (ts == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        unsigned long long inverted = ~ts;          /* 2**64 - 1 - ts */

        PyObject *vkey = PyBytes_FromStringAndSize(NULL, plen + 8);
        if (vkey == NULL)
            goto done;
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(vkey);
        memcpy(out, prefix, (size_t)plen);
        for (int b = 7; b >= 0; b--) {
            out[plen + b] = (unsigned char)(inverted & 0xFF);
            inverted >>= 8;
        }
        int failed = PyList_Append(vkeys, vkey);
        Py_DECREF(vkey);
        if (failed)
            goto done;
        *nbytes += plen + 8;

        PyObject *value = PyTuple_GET_ITEM(version, 1);
        if (value == Py_None) {
            if (PyList_Append(values, TOMBSTONE))
                goto done;
            *nbytes += 1;
            continue;
        }
        if (!PyBytes_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "a version's value must be bytes or None");
            goto done;
        }
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        PyObject *row = PyBytes_FromStringAndSize(NULL, vlen + 1);
        if (row == NULL)
            goto done;
        char *r = PyBytes_AS_STRING(row);
        r[0] = 0x01;
        memcpy(r + 1, PyBytes_AS_STRING(value), (size_t)vlen);
        failed = PyList_Append(values, row);
        Py_DECREF(row);
        if (failed)
            goto done;
        *nbytes += vlen + 1;
    }
    rc = 0;
done:
    if (prefix != stack_prefix)
        PyMem_Free(prefix);
    return rc;
}

static PyObject *
encode_rows(PyObject *self, PyObject *args)
{
    PyObject *items, *cached = Py_None;
    Py_ssize_t max_rows = -1;
    if (!PyArg_ParseTuple(args, "O|On:encode_rows", &items, &cached, &max_rows))
        return NULL;
    PyObject *it = PyObject_GetIter(items);
    if (it == NULL)
        return NULL;
    PyObject *vkeys = PyList_New(0);
    PyObject *values = PyList_New(0);
    Py_ssize_t taken = 0, nbytes = 0;
    int cached_is_dict = cached != Py_None && PyDict_Check(cached);
    PyObject *item = NULL;
    if (vkeys == NULL || values == NULL)
        goto error;

    while ((item = PyIter_Next(it)) != NULL) {
        taken++;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "items must be (key, chain) tuples");
            goto error;
        }
        PyObject *key = PyTuple_GET_ITEM(item, 0);
        PyObject *chain = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_Check(key) || !PyList_Check(chain)) {
            PyErr_SetString(PyExc_TypeError, "a key must be bytes and its chain a list");
            goto error;
        }
        Py_ssize_t n = PyList_GET_SIZE(chain);
        if (cached_is_dict && n) {
            /* Only keys already cached are updated, so the dict-level store replaces a
             * value in place: no entry is added or moved, which is what keeps an
             * OrderedDict's links and LRU order intact (they index the dict's entries).
             * The OrderedDict's own __setitem__ measured ~2x slower here. */
            if (PyDict_GetItemWithError(cached, key) != NULL) {
                if (PyDict_SetItem(cached, key, PyList_GET_ITEM(chain, n - 1)) < 0)
                    goto error;
            }
            else if (PyErr_Occurred())
                goto error;
        }
        else if (cached != Py_None && n) {
            int present = PySequence_Contains(cached, key);
            if (present < 0)
                goto error;
            if (present && PyObject_SetItem(cached, key, PyList_GET_ITEM(chain, n - 1)) < 0)
                goto error;
        }
        if (append_rows(key, chain, vkeys, values, &nbytes) < 0)
            goto error;
        Py_CLEAR(item);
        if (max_rows >= 0 && PyList_GET_SIZE(vkeys) >= max_rows)
            break;                    /* the rest of items stays unconsumed */
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(it);
    return Py_BuildValue("nNNn", taken, vkeys, values, nbytes);

error:
    Py_XDECREF(item);
    Py_XDECREF(vkeys);
    Py_XDECREF(values);
    Py_DECREF(it);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_rows", encode_rows, METH_VARARGS,
     "encode_rows(items, cached=None, max_rows=-1) -> (taken, vkeys, values, nbytes); see shard.flush."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shard._rowcodec",
    "The flush's row encoder in C (see shard.flush.python_encode_rows).", -1, methods,
};

PyMODINIT_FUNC
PyInit__rowcodec(void)
{
    TOMBSTONE = PyBytes_FromStringAndSize("\x00", 1);
    if (TOMBSTONE == NULL)
        return NULL;
    return PyModule_Create(&module);
}
