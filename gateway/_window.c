/* The dedupe window's per-key loops (docs/internals.md "The dedupe"): gateway._window.

   The same functions, with the same results, are written in Python in
   gateway/store/window.py, which uses these where this module was built (setup.py: the build
   is optional). tests/unit/test_window_native.py holds the two to each other.

   A key is 16 bytes of BLAKE2b output, uniform: its slots come from its own first 8 bytes
   read as a little-endian integer h, slot a = h & mask and slot b = a ^ (h >> 40 & 63)
   (another slot among the same 64: one cache line). `mask` is the number of slots less
   one, a power of two less one, at least 63.

   The window's table is a byte a slot, a bit of it a day (a plane); a day held apart is a
   bitmap, a bit a slot. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KEY_BYTES 16

static uint64_t
low64(const unsigned char *k)
{
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--)
        h = (h << 8) | k[i];
    return h;
}

static uint64_t
high64(const unsigned char *k)  /* big-endian: numeric order is byte order */
{
    uint64_t h = 0;
    for (int i = 0; i < 8; i++)
        h = (h << 8) | k[i];
    return h;
}

static int
bad_size(void)
{
    PyErr_Format(PyExc_ValueError, "dedupe keys are %d bytes each", KEY_BYTES);
    return -1;
}

/* The key at index i of a list of bytes, checked for its size. */
static const unsigned char *
key_at(PyObject *keys, Py_ssize_t i)
{
    PyObject *k = PyList_GET_ITEM(keys, i);
    if (!PyBytes_Check(k) || PyBytes_GET_SIZE(k) != KEY_BYTES) {
        bad_size();
        return NULL;
    }
    return (const unsigned char *)PyBytes_AS_STRING(k);
}

/* `bits` (writable, exactly `size` bytes) and `mask` (slots less one) from the arguments. */
static int
table_of(PyObject *obj, unsigned long long mask, Py_ssize_t size_shift, Py_buffer *view)
{
    if (mask < 63 || (mask & (mask + 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "slots must be a power of two, at least 64");
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if ((unsigned long long)view->len != ((mask + 1) >> size_shift)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the table's size does not match its slots");
        return -1;
    }
    return 0;
}

/* The keys to mark: a list of bytes, or the keys packed in one bytes-like object. */
typedef struct {
    PyObject *list;
    Py_buffer packed;
    Py_ssize_t n;
} Keys;

static int
keys_of(PyObject *obj, Keys *keys)
{
    keys->list = NULL;
    if (PyList_Check(obj)) {
        keys->list = obj;
        keys->n = PyList_GET_SIZE(obj);
        return 0;
    }
    if (PyObject_GetBuffer(obj, &keys->packed, PyBUF_SIMPLE) < 0)
        return -1;
    if (keys->packed.len % KEY_BYTES != 0) {
        PyBuffer_Release(&keys->packed);
        return bad_size();
    }
    keys->n = keys->packed.len / KEY_BYTES;
    return 0;
}

static const unsigned char *
key_of(Keys *keys, Py_ssize_t i)
{
    if (keys->list != NULL)
        return key_at(keys->list, i);
    return (const unsigned char *)keys->packed.buf + i * KEY_BYTES;
}

static void
keys_done(Keys *keys)
{
    if (keys->list == NULL)
        PyBuffer_Release(&keys->packed);
}

/* Both slots of each key marked: `bit` in a plane's bytes, or the slot's bit of a bitmap
   (`apart`). */
static PyObject *
mark_keys(PyObject *table, unsigned long long mask, unsigned int bit, PyObject *obj, int apart)
{
    Py_buffer view;
    Keys keys;
    if (table_of(table, mask, apart ? 3 : 0, &view) < 0)
        return NULL;
    if (keys_of(obj, &keys) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *bits = view.buf;
    for (Py_ssize_t i = 0; i < keys.n; i++) {
        const unsigned char *k = key_of(&keys, i);
        if (k == NULL)
            break;
        uint64_t h = low64(k), a = h & mask, b = a ^ (h >> 40 & 63);
        if (apart) {
            bits[a >> 3] |= (unsigned char)(1u << (a & 7));
            bits[b >> 3] |= (unsigned char)(1u << (b & 7));
        } else {
            bits[a] |= (unsigned char)bit;
            bits[b] |= (unsigned char)bit;
        }
    }
    keys_done(&keys);
    PyBuffer_Release(&view);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* mark(bits, mask, bit, keys): set `bit` in both slots of each key. */
static PyObject *
mark(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *table, *obj;
    unsigned long long mask;
    unsigned int bit;
    if (!PyArg_ParseTuple(args, "OKIO", &table, &mask, &bit, &obj))
        return NULL;
    return mark_keys(table, mask, bit, obj, 0);
}

/* check(bits, mask, new, keys): [(key, v)] for each key whose slots share bits v (the
   planes that may hold it), in the keys' order; then `new` set in both slots of every key. */
static PyObject *
check(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *table, *keys;
    unsigned long long mask;
    unsigned int new;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OKIO!", &table, &mask, &new, &PyList_Type, &keys))
        return NULL;
    if (table_of(table, mask, 0, &view) < 0)
        return NULL;
    PyObject *maybe = PyList_New(0);
    if (maybe == NULL)
        goto fail;
    unsigned char *bits = view.buf;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *k = key_at(keys, i);
        if (k == NULL)
            goto fail;
        uint64_t h = low64(k), a = h & mask, b = a ^ (h >> 40 & 63);
        unsigned char x = bits[a], y = bits[b], v = x & y;
        if (v) {
            PyObject *pair = Py_BuildValue("(Oi)", PyList_GET_ITEM(keys, i), (int)v);
            if (pair == NULL || PyList_Append(maybe, pair) < 0) {
                Py_XDECREF(pair);
                goto fail;
            }
            Py_DECREF(pair);
        }
        bits[a] = x | (unsigned char)new;
        bits[b] = y | (unsigned char)new;
    }
    goto done;
fail:
    Py_CLEAR(maybe);
done:
    PyBuffer_Release(&view);
    return maybe;
}

/* mark_apart(bits, mask, keys): a day's bitmap, both slots of each key set. */
static PyObject *
mark_apart(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *table, *obj;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "OKO", &table, &mask, &obj))
        return NULL;
    return mark_keys(table, mask, 0, obj, 1);
}

/* holds_apart(bits, mask, keys): the keys both of whose slots are set, in order. */
static PyObject *
holds_apart(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *table, *keys;
    unsigned long long mask;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "OKO!", &table, &mask, &PyList_Type, &keys))
        return NULL;
    if (table_of(table, mask, 3, &view) < 0)
        return NULL;
    PyObject *held = PyList_New(0);
    if (held == NULL)
        goto fail;
    const unsigned char *bits = view.buf;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *k = key_at(keys, i);
        if (k == NULL)
            goto fail;
        uint64_t h = low64(k), a = h & mask, b = a ^ (h >> 40 & 63);
        if ((bits[a >> 3] >> (a & 7) & 1) && (bits[b >> 3] >> (b & 7) & 1)) {
            if (PyList_Append(held, PyList_GET_ITEM(keys, i)) < 0)
                goto fail;
        }
    }
    PyBuffer_Release(&view);
    return held;
fail:
    PyBuffer_Release(&view);
    Py_XDECREF(held);
    return NULL;
}

/* clear(bits, plane): the plane's bit cleared in every slot. */
static PyObject *
clear(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    unsigned int plane;
    if (!PyArg_ParseTuple(args, "w*I", &view, &plane))
        return NULL;
    if (plane > 7) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "a plane is 0 to 7");
        return NULL;
    }
    unsigned char keep = (unsigned char)~(1u << plane), *bits = view.buf;
    for (Py_ssize_t i = 0; i < view.len; i++)
        bits[i] &= keep;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* copy_plane(bits, plane, out): bit i of `out` (len(bits) / 8 bytes) is slot i's bit of the
   plane. */
static PyObject *
copy_plane(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view, out;
    unsigned int plane;
    if (!PyArg_ParseTuple(args, "y*Iw*", &view, &plane, &out))
        return NULL;
    if (plane > 7 || view.len % 8 != 0 || out.len != view.len / 8) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "a plane is 0 to 7, copied into a bit a slot");
        return NULL;
    }
    const unsigned char *bits = view.buf;
    unsigned char *dst = out.buf;
    for (Py_ssize_t i = 0; i < out.len; i++) {
        unsigned char v = 0;
        for (int j = 0; j < 8; j++)
            v |= (unsigned char)((bits[i * 8 + j] >> plane & 1) << j);
        dst[i] = v;
    }
    PyBuffer_Release(&view);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

typedef struct {
    uint64_t hi, lo;
    PyObject *key;
} Sorted;

static int
by_key(const void *x, const void *y)
{
    const Sorted *a = x, *b = y;
    if (a->hi != b->hi)
        return a->hi < b->hi ? -1 : 1;
    if (a->lo != b->lo)
        return a->lo < b->lo ? -1 : 1;
    return 0;
}

/* unique_sorted(keys): sorted(set(keys)) for a list of 16-byte keys, made of the list's own
   objects (one of each run of equal keys). */
static PyObject *
unique_sorted(PyObject *Py_UNUSED(self), PyObject *keys)
{
    if (!PyList_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    Sorted *items = PyMem_Malloc(sizeof(Sorted) * (size_t)(n ? n : 1));
    if (items == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *k = key_at(keys, i);
        if (k == NULL) {
            PyMem_Free(items);
            return NULL;
        }
        items[i].hi = high64(k);
        items[i].lo = high64(k + 8);
        items[i].key = PyList_GET_ITEM(keys, i);
    }
    qsort(items, (size_t)n, sizeof(Sorted), by_key);
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (m == 0 || by_key(&items[m - 1], &items[i]) != 0)
            items[m++] = items[i];
    PyObject *out = PyList_New(m);
    if (out != NULL) {
        for (Py_ssize_t i = 0; i < m; i++) {
            Py_INCREF(items[i].key);
            PyList_SET_ITEM(out, i, items[i].key);
        }
    }
    PyMem_Free(items);
    return out;
}

static PyMethodDef methods[] = {
    {"mark", mark, METH_VARARGS, "mark(bits, mask, bit, keys): set bit in each key's slots"},
    {"check", check, METH_VARARGS,
     "check(bits, mask, new, keys): [(key, planes)] of keys whose slots share bits; new set"},
    {"mark_apart", mark_apart, METH_VARARGS, "mark_apart(bitmap, mask, keys)"},
    {"holds_apart", holds_apart, METH_VARARGS, "holds_apart(bitmap, mask, keys) -> keys"},
    {"clear", clear, METH_VARARGS, "clear(bits, plane): the plane's bit cleared everywhere"},
    {"copy_plane", copy_plane, METH_VARARGS, "copy_plane(bits, plane, out): a bit a slot"},
    {"unique_sorted", unique_sorted, METH_O, "unique_sorted(keys): sorted(set(keys))"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._window", "The dedupe window's per-key loops.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__window(void)
{
    return PyModule_Create(&module);
}
