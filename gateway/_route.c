/* The common record's counted calls taken in C (gateway/actors/fast.py; docs/internals.md
 * "The compiled take").
 *
 * take_counted(...) does for an inbox record what the router, the dispatcher's `_deliver` and
 * the actors' `_take` do in Python for each of its track, page and screen calls that becomes a
 * ledger hit: the dedupe key (BLAKE2b-128 of the source's prefix and the messageId), the
 * account (the context's groupId, else the user's known account, else the user), the
 * account's actor (activated through a Python callback when it is not live), and the actor's
 * tally (`hits` keyed by (UTC date, user, event): its LedgerKey, and a `Latest` counting the
 * occurrences and keeping the latest message). It returns the positions of the messages it
 * left to Python (identify, group, alias: none of them is a ledger hit), or None when it took
 * nothing: whenever any counted call of the record is one it does not handle (integrations,
 * no userId or one that is not a string, a timestamp not in UTC or none, no messageId, a view
 * without a plain name, a message read in full), or when a group call in the record could
 * change the account of a counted call that has no groupId of its own. The record is checked
 * whole before anything is changed, so a refusal leaves every actor as it was and the Python
 * path routes the record as it always has.
 *
 * BLAKE2b below follows RFC 7693 (appendix C) and the BLAKE2 reference implementation (CC0):
 * CPython 3.11 exports no C API for hashlib's. tests/unit/test_route_kernel.py holds it to
 * hashlib.blake2b, and take_counted's actor state to the pure path's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* ---- BLAKE2b ------------------------------------------------------------------------- */

typedef struct {
    uint8_t b[128];
    uint64_t h[8];
    uint64_t t[2];
    size_t c;
    size_t outlen;
} blake2b_ctx;

static const uint64_t blake2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL, 0xA54FF53A5F1D36F1ULL,
    0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL, 0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static const uint8_t blake2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))

#define B2B_G(a, b, c, d, x, y)          \
    do {                                 \
        v[a] = v[a] + v[b] + (x);        \
        v[d] = ROTR64(v[d] ^ v[a], 32);  \
        v[c] = v[c] + v[d];              \
        v[b] = ROTR64(v[b] ^ v[c], 24);  \
        v[a] = v[a] + v[b] + (y);        \
        v[d] = ROTR64(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];              \
        v[b] = ROTR64(v[b] ^ v[c], 63);  \
    } while (0)

static uint64_t load64(const uint8_t *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) |
           ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
}

static void blake2b_compress(blake2b_ctx *ctx, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = ctx->h[i];
        v[i + 8] = blake2b_iv[i];
    }
    v[12] ^= ctx->t[0];
    v[13] ^= ctx->t[1];
    if (last)
        v[14] = ~v[14];
    for (int i = 0; i < 16; i++)
        m[i] = load64(&ctx->b[8 * i]);
    for (int i = 0; i < 12; i++) {
        const uint8_t *s = blake2b_sigma[i];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++)
        ctx->h[i] ^= v[i] ^ v[i + 8];
}

static void blake2b_init(blake2b_ctx *ctx, size_t outlen)
{
    for (int i = 0; i < 8; i++)
        ctx->h[i] = blake2b_iv[i];
    ctx->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen; /* no key: key length 0 */
    ctx->t[0] = ctx->t[1] = 0;
    ctx->c = 0;
    ctx->outlen = outlen;
}

static void blake2b_update(blake2b_ctx *ctx, const uint8_t *in, size_t inlen)
{
    for (size_t i = 0; i < inlen; i++) {
        if (ctx->c == 128) {
            ctx->t[0] += ctx->c;
            if (ctx->t[0] < ctx->c)
                ctx->t[1]++;
            blake2b_compress(ctx, 0);
            ctx->c = 0;
        }
        ctx->b[ctx->c++] = in[i];
    }
}

static void blake2b_final(blake2b_ctx *ctx, uint8_t *out)
{
    ctx->t[0] += ctx->c;
    if (ctx->t[0] < ctx->c)
        ctx->t[1]++;
    while (ctx->c < 128)
        ctx->b[ctx->c++] = 0;
    blake2b_compress(ctx, 1);
    for (size_t i = 0; i < ctx->outlen; i++)
        out[i] = (uint8_t)((ctx->h[i >> 3] >> (8 * (i & 7))) & 0xFF);
}

#define DEDUPE_BYTES 16 /* gateway.keys.DEDUPE_BYTES */

static PyObject *dedupe_bytes(const char *prefix, Py_ssize_t plen, const char *id, Py_ssize_t ilen)
{
    blake2b_ctx ctx;
    uint8_t out[DEDUPE_BYTES];
    blake2b_init(&ctx, DEDUPE_BYTES);
    blake2b_update(&ctx, (const uint8_t *)prefix, (size_t)plen);
    blake2b_update(&ctx, (const uint8_t *)id, (size_t)ilen);
    blake2b_final(&ctx, out);
    return PyBytes_FromStringAndSize((const char *)out, DEDUPE_BYTES);
}

/* blake2b_16(data) -> bytes: hashlib.blake2b(data, digest_size=16).digest() (for tests) */
static PyObject *py_blake2b_16(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    (void)self;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = dedupe_bytes(view.buf, view.len, "", 0);
    PyBuffer_Release(&view);
    return out;
}

/* ---- what the kernel is set up with (`setup`, once, from gateway/actors/fast.py) -------- */

/* Fields are read and written at their slots' offsets, as their member descriptors do
 * (msgspec Structs and classes with __slots__ keep each field in a slot): a GetAttr
 * looks the name up in the type first, several times a message. */
typedef struct {
    Py_ssize_t user, mid, at, integrations, context, event, name, properties;
} MessageSlots;

static struct {
    PyObject *track, *page, *screen;  /* StoredTrack, StoredPage, StoredScreen: exact types */
    PyObject *counted, *group;        /* the plain classes CountedCall and GroupCall */
    PyObject *context, *view_props;   /* Context, ViewProperties: exact types */
    PyObject *utc;                    /* datetime.UTC */
    PyObject *unset;                  /* msgspec.UNSET */
    PyObject *ledger_key, *latest;    /* LedgerKey (a tuple subclass), Latest */
    PyObject *actor;                  /* Actor */
    MessageSlots slots[3];            /* of track, page, screen */
    Py_ssize_t group_id, props_name;  /* Context.groupId, ViewProperties.name */
    Py_ssize_t held, last, hits, hit_keys, hit_refs;  /* Actor's */
    Py_ssize_t count, at, item;       /* Latest's */
    int ready;
} K;

#define SLOT(obj, offset) (*(PyObject **)((char *)(obj) + (offset)))

static PyObject *s_userId, *one;

/* The offset of `type`'s field `name`: its member descriptor's; -1 with an error when it is
 * not an object slot. */
static Py_ssize_t slot_of(PyObject *type, const char *name)
{
    PyObject *d = PyObject_GetAttrString(type, name);
    if (d == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if ((m->type == T_OBJECT_EX || m->type == T_OBJECT) && !(m->flags & READONLY))
            offset = m->offset;
    }
    Py_DECREF(d);
    if (offset < 0)
        PyErr_Format(PyExc_TypeError, "setup: %R.%s is not a writable object slot", type, name);
    return offset;
}

static int message_slots(PyObject *type, MessageSlots *out, int view)
{
    out->event = out->name = out->properties = -1;
    if ((out->user = slot_of(type, "userId")) < 0 ||
        (out->mid = slot_of(type, "messageId")) < 0 ||
        (out->at = slot_of(type, "timestamp")) < 0 ||
        (out->integrations = slot_of(type, "integrations")) < 0 ||
        (out->context = slot_of(type, "context")) < 0)
        return -1;
    if (!view)
        return (out->event = slot_of(type, "event")) < 0 ? -1 : 0;
    if ((out->name = slot_of(type, "name")) < 0 ||
        (out->properties = slot_of(type, "properties")) < 0)
        return -1;
    return 0;
}

static PyObject *py_setup(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *v[12];
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOO", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                          &v[6], &v[7], &v[8], &v[9], &v[10], &v[11]))
        return NULL;
    for (int i = 0; i < 12; i++) {
        if (i != 7 && i != 8 && !PyType_Check(v[i])) {
            PyErr_Format(PyExc_TypeError, "setup: argument %d is not a type", i + 1);
            return NULL;
        }
    }
    if (!PyType_IsSubtype((PyTypeObject *)v[9], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "setup: the ledger key must be a tuple subclass");
        return NULL;
    }
    if (message_slots(v[0], &K.slots[0], 0) < 0 || message_slots(v[1], &K.slots[1], 1) < 0 ||
        message_slots(v[2], &K.slots[2], 1) < 0 ||
        (K.group_id = slot_of(v[5], "groupId")) < 0 ||
        (K.props_name = slot_of(v[6], "name")) < 0 ||
        (K.held = slot_of(v[11], "held")) < 0 || (K.last = slot_of(v[11], "last")) < 0 ||
        (K.hits = slot_of(v[11], "hits")) < 0 || (K.hit_keys = slot_of(v[11], "hit_keys")) < 0 ||
        (K.hit_refs = slot_of(v[11], "hit_refs")) < 0 ||
        (K.count = slot_of(v[10], "count")) < 0 || (K.at = slot_of(v[10], "at")) < 0 ||
        (K.item = slot_of(v[10], "item")) < 0)
        return NULL;
    for (int i = 0; i < 12; i++)
        Py_INCREF(v[i]);
    K.track = v[0], K.page = v[1], K.screen = v[2], K.counted = v[3], K.group = v[4];
    K.context = v[5], K.view_props = v[6], K.utc = v[7], K.unset = v[8], K.ledger_key = v[9];
    K.latest = v[10], K.actor = v[11];
    K.ready = 1;
    Py_RETURN_NONE;
}

/* A slot's value (borrowed), NULL with AttributeError when it was never set. */
static PyObject *slot(PyObject *obj, Py_ssize_t offset)
{
    PyObject *v = SLOT(obj, offset);
    if (v == NULL)
        PyErr_SetString(PyExc_AttributeError, "take_counted: a field is not set");
    return v;
}

static void set_slot(PyObject *obj, Py_ssize_t offset, PyObject *value)
{
    Py_XSETREF(SLOT(obj, offset), Py_NewRef(value));
}

/* obj.<slot> += 1 */
static int add_one(PyObject *obj, Py_ssize_t offset)
{
    PyObject *v = slot(obj, offset);
    if (v == NULL)
        return -1;
    PyObject *more = PyNumber_Add(v, one);
    if (more == NULL)
        return -1;
    Py_XSETREF(SLOT(obj, offset), more);
    return 0;
}

/* ---- the Segment model's rules, as gateway/segment.py and gateway/mapping/calls.py say -- */

/* `id_str(value)`: a new reference to a non-empty string (an int stringified), or NULL with
 * no error set for None. */
static PyObject *id_str(PyObject *value)
{
    if (PyBool_Check(value))
        return NULL;
    if (PyLong_Check(value))
        return PyObject_Str(value); /* may fail: the caller checks PyErr_Occurred */
    if (PyUnicode_Check(value) && PyUnicode_GET_LENGTH(value) > 0) {
        Py_INCREF(value);
        return value;
    }
    return NULL;
}

/* `isinstance(s, str) and s.strip()` */
static int plain_name(PyObject *s)
{
    if (!PyUnicode_Check(s))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!Py_UNICODE_ISSPACE(PyUnicode_READ(kind, data, i)))
            return 1;
    }
    return 0;
}

/* ---- user_ids ---------------------------------------------------------------------------- */

/* user_ids(messages) -> list: `[user_id(m) for m in messages]` */
static PyObject *py_user_ids(PyObject *self, PyObject *messages)
{
    (void)self;
    if (!PyList_Check(messages)) {
        PyErr_SetString(PyExc_TypeError, "user_ids: a list of messages");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(messages);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *raw = PyObject_GetAttr(PyList_GET_ITEM(messages, i), s_userId);
        if (raw == NULL)
            goto fail;
        PyObject *user = id_str(raw);
        Py_DECREF(raw);
        if (user == NULL) {
            if (PyErr_Occurred())
                goto fail;
            user = Py_NewRef(Py_None);
        }
        PyList_SET_ITEM(out, i, user);
    }
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- take_counted ------------------------------------------------------------------------ */

typedef struct {
    PyObject *msg;      /* borrowed: the list holds it */
    PyObject *user;     /* new references from here on */
    PyObject *event;
    PyObject *account;
    PyObject *at;
    PyObject *mid;      /* the messageId (its UTF-8 cached on the str) */
} Hit;

static void release(Hit *hits, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(hits[i].user);
        Py_XDECREF(hits[i].event);
        Py_XDECREF(hits[i].account);
        Py_XDECREF(hits[i].at);
        Py_XDECREF(hits[i].mid);
    }
}

/* 1: `h` filled for the counted call `msg` (its fields' slots `at`); 0: not handled (no
 * error); -1: an error. `*own_group` says whether its account came from its context. */
static int check_counted(PyObject *msg, const MessageSlots *at, int view, PyObject *known, Hit *h,
                         int *own_group)
{
    PyObject *v;
    if ((v = slot(msg, at->integrations)) == NULL)
        return -1;
    if (v != Py_None)
        return 0;

    if ((v = slot(msg, at->mid)) == NULL)
        return -1;
    if (!PyUnicode_Check(v) || PyUnicode_GET_LENGTH(v) == 0)
        return 0;
    Py_ssize_t len;
    if (PyUnicode_AsUTF8AndSize(v, &len) == NULL) {
        PyErr_Clear(); /* a lone surrogate: Python's path decides */
        return 0;
    }
    h->mid = Py_NewRef(v);

    if ((v = slot(msg, at->user)) == NULL)
        return -1;
    if (!PyUnicode_Check(v) || PyUnicode_GET_LENGTH(v) == 0)
        return 0;
    h->user = Py_NewRef(v);

    if ((v = slot(msg, at->at)) == NULL)
        return -1;
    if (!PyDateTime_Check(v) || PyDateTime_DATE_GET_TZINFO(v) != K.utc)
        return 0;
    h->at = Py_NewRef(v);

    if (!view) {
        if ((v = slot(msg, at->event)) == NULL)
            return -1;
        if (!PyUnicode_Check(v) || PyUnicode_GET_LENGTH(v) == 0)
            return 0;
        h->event = Py_NewRef(v);
    } else {
        PyObject *name = slot(msg, at->name);
        if (name == NULL)
            return -1;
        if (!plain_name(name)) {
            PyObject *props = slot(msg, at->properties);
            if (props == NULL)
                return -1;
            if ((PyObject *)Py_TYPE(props) != K.view_props)
                return 0; /* none, or not named: `unnamed_pages` decides, in Python */
            if ((name = slot(props, K.props_name)) == NULL)
                return -1;
            if (!plain_name(name))
                return 0;
        }
        h->event = PyUnicode_FromFormat(
            (PyObject *)Py_TYPE(msg) == K.page ? "Page Viewed %U" : "Screen Viewed %U", name);
        if (h->event == NULL)
            return -1;
    }

    PyObject *context = slot(msg, at->context);
    if (context == NULL)
        return -1;
    PyObject *group = NULL;
    if (context != Py_None) {
        if ((PyObject *)Py_TYPE(context) != K.context)
            return 0;
        PyObject *raw = slot(context, K.group_id);
        if (raw == NULL)
            return -1;
        if (raw != K.unset && raw != Py_None) {
            group = id_str(raw);
            if (group == NULL && PyErr_Occurred())
                return -1;
        }
    }
    *own_group = group != NULL;
    if (group != NULL) {
        h->account = group;
        return 1;
    }
    /* `known.get(user) or user` */
    PyObject *found = PyDict_GetItemWithError(known, h->user);
    if (found == NULL && PyErr_Occurred())
        return -1;
    if (found != NULL && PyObject_IsTrue(found) == 1)
        h->account = Py_NewRef(found);
    else
        h->account = Py_NewRef(h->user);
    return 1;
}

/* The account's actor for this record, in `touched` (account -> actor): on its first hit of
 * the record, found live or activated, moved to the end of the live registry, `last` set,
 * and held from now on. A borrowed reference. */
static PyObject *actor_of(PyObject *account, PyObject *touched, PyObject *live,
                          PyObject *source_id, PyObject *partition, PyObject *clock,
                          PyObject *holding, PyObject *activate)
{
    PyObject *actor = PyDict_GetItemWithError(touched, account);
    if (actor != NULL || PyErr_Occurred())
        return actor;
    PyObject *key = PyTuple_Pack(3, source_id, account, partition);
    if (key == NULL)
        return NULL;
    actor = PyDict_GetItemWithError(live, key);
    if (actor != NULL) {
        /* as `_deliver`: to the end of the registry, most recently used */
        Py_INCREF(actor);
        if (PyDict_DelItem(live, key) < 0 || PyDict_SetItem(live, key, actor) < 0) {
            Py_DECREF(actor);
            Py_DECREF(key);
            return NULL;
        }
        set_slot(actor, K.last, clock);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    } else {
        actor = PyObject_CallOneArg(activate, account);
        if (actor == NULL) {
            Py_DECREF(key);
            return NULL;
        }
        if ((PyObject *)Py_TYPE(actor) != K.actor) {
            PyErr_SetString(PyExc_TypeError, "take_counted: activate did not return an Actor");
            Py_DECREF(actor);
            Py_DECREF(key);
            return NULL;
        }
    }
    Py_DECREF(key);
    PyObject *held = slot(actor, K.held);
    int idle = held == NULL ? -1 : PyObject_Not(held);
    int err = idle < 0 || (idle && PyList_Append(holding, actor) < 0) ||
              PyDict_SetItem(touched, account, actor) < 0;
    Py_DECREF(actor); /* `touched` holds it */
    return err ? NULL : actor;
}

/* One more occurrence in the actor's tally: `Actor._take` for a hit. */
static int take_hit(Hit *h, PyObject *actor, PyObject *key, PyObject *source_id)
{
    PyObject *hits = slot(actor, K.hits), *hit_keys = slot(actor, K.hit_keys);
    PyObject *hit_refs = slot(actor, K.hit_refs);
    if (hits == NULL || hit_keys == NULL || hit_refs == NULL || !PyDict_Check(hits) ||
        !PyList_Check(hit_keys) || !PyList_Check(hit_refs)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "take_counted: an actor's hits are not as built");
        return -1;
    }
    if (add_one(actor, K.held) < 0 || PyList_Append(hit_keys, key) < 0)
        return -1;
    int y = PyDateTime_GET_YEAR(h->at), m = PyDateTime_GET_MONTH(h->at),
        d = PyDateTime_GET_DAY(h->at);
    PyObject *date = PyDate_FromDate(y, m, d);
    if (date == NULL)
        return -1;
    PyObject *shortkey = PyTuple_Pack(3, date, h->user, h->event);
    Py_DECREF(date);
    if (shortkey == NULL)
        return -1;
    PyObject *found = PyDict_GetItemWithError(hits, shortkey);
    if (found != NULL) {
        Py_DECREF(shortkey);
        if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) != 2) {
            PyErr_SetString(PyExc_TypeError, "take_counted: a hit is not (key, latest)");
            return -1;
        }
        if (PyList_Append(hit_refs, PyTuple_GET_ITEM(found, 0)) < 0)
            return -1;
        /* `Latest.add`: the later taken among equal times */
        PyObject *latest = PyTuple_GET_ITEM(found, 1);
        if ((PyObject *)Py_TYPE(latest) != K.latest) {
            PyErr_SetString(PyExc_TypeError, "take_counted: a hit's latest is not a Latest");
            return -1;
        }
        if (add_one(latest, K.count) < 0)
            return -1;
        PyObject *at = slot(latest, K.at);
        if (at == NULL)
            return -1;
        int later = PyObject_RichCompareBool(h->at, at, Py_GE);
        if (later < 0)
            return -1;
        if (later) {
            set_slot(latest, K.at, h->at);
            set_slot(latest, K.item, h->msg);
        }
        return 0;
    }
    if (PyErr_Occurred()) {
        Py_DECREF(shortkey);
        return -1;
    }
    /* `utc_day(at)`: date.isoformat(), "%04d-%02d-%02d" (years 1 to 9999) */
    char day[10] = {(char)('0' + y / 1000), (char)('0' + y / 100 % 10), (char)('0' + y / 10 % 10),
                    (char)('0' + y % 10), '-', (char)('0' + m / 10), (char)('0' + m % 10), '-',
                    (char)('0' + d / 10), (char)('0' + d % 10)};
    PyObject *day_text = PyUnicode_FromStringAndSize(day, 10);
    if (day_text == NULL) {
        Py_DECREF(shortkey);
        return -1;
    }
    PyObject *fields = PyTuple_Pack(5, source_id, day_text, h->user, h->account, h->event);
    Py_DECREF(day_text);
    PyObject *ledger_key = NULL, *latest = NULL, *value = NULL;
    PyObject *wrapped = fields == NULL ? NULL : PyTuple_Pack(1, fields);
    Py_XDECREF(fields);
    if (wrapped != NULL) {
        /* what the NamedTuple's __new__ does (tuple.__new__(cls, fields)), without its
         * Python frame */
        ledger_key = PyTuple_Type.tp_new((PyTypeObject *)K.ledger_key, wrapped, NULL);
        Py_DECREF(wrapped);
    }
    if (ledger_key != NULL)
        latest = PyObject_CallFunctionObjArgs(K.latest, h->at, h->msg, NULL);
    if (latest != NULL)
        value = PyTuple_Pack(2, ledger_key, latest);
    int err = value == NULL || PyDict_SetItem(hits, shortkey, value) < 0 ||
              PyList_Append(hit_refs, ledger_key) < 0;
    Py_DECREF(shortkey);
    Py_XDECREF(ledger_key);
    Py_XDECREF(latest);
    Py_XDECREF(value);
    return err ? -1 : 0;
}

/* take_counted(messages, prefix, known, source_id, partition, live, holding, clock, activate)
 *   -> list[int] | None */
static PyObject *py_take_counted(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (!K.ready) {
        PyErr_SetString(PyExc_RuntimeError, "take_counted: setup() was not called");
        return NULL;
    }
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "take_counted takes 9 arguments");
        return NULL;
    }
    PyObject *messages = args[0], *prefix = args[1], *known = args[2], *source_id = args[3];
    PyObject *partition = args[4], *live = args[5], *holding = args[6], *clock = args[7];
    PyObject *activate = args[8];
    if (!PyList_Check(messages) || !PyBytes_Check(prefix) || !PyDict_Check(known) ||
        !PyDict_Check(live) || !PyList_Check(holding)) {
        PyErr_SetString(PyExc_TypeError, "take_counted: wrong argument types");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(messages);
    Hit *hits = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Hit));
    if (hits == NULL)
        return PyErr_NoMemory();
    PyObject *left = PyList_New(0), *touched = NULL, *result = NULL;
    Py_ssize_t taken = 0;
    int grouped = 0, borrowed = 0; /* a group call; a hit whose account the user's */
    if (left == NULL)
        goto done;

    /* first the whole record is checked, nothing changed */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *msg = PyList_GET_ITEM(messages, i);
        PyObject *type = (PyObject *)Py_TYPE(msg);
        int which = type == K.track ? 0 : type == K.page ? 1 : type == K.screen ? 2 : -1;
        if (which >= 0) {
            Hit *h = &hits[taken++];
            h->msg = msg;
            int own_group = 0;
            int ok = check_counted(msg, &K.slots[which], which > 0, known, h, &own_group);
            if (ok < 0)
                goto done;
            if (ok == 0)
                goto refuse;
            borrowed |= !own_group;
            continue;
        }
        if (PyType_IsSubtype((PyTypeObject *)type, (PyTypeObject *)K.counted))
            goto refuse; /* a counted call read in full */
        grouped |= PyType_IsSubtype((PyTypeObject *)type, (PyTypeObject *)K.group);
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL || PyList_Append(left, index) < 0) {
            Py_XDECREF(index);
            goto done;
        }
        Py_DECREF(index);
    }
    if (grouped && borrowed)
        goto refuse; /* a group call before it may move its user to another account */

    /* then taken */
    touched = PyDict_New();
    if (touched == NULL)
        goto done;
    const char *pfx = PyBytes_AS_STRING(prefix);
    Py_ssize_t plen = PyBytes_GET_SIZE(prefix);
    for (Py_ssize_t i = 0; i < taken; i++) {
        Hit *h = &hits[i];
        Py_ssize_t len;
        const char *id = PyUnicode_AsUTF8AndSize(h->mid, &len); /* cached: cannot fail now */
        if (id == NULL)
            goto done;
        PyObject *key = dedupe_bytes(pfx, plen, id, len);
        if (key == NULL)
            goto done;
        PyObject *actor = actor_of(h->account, touched, live, source_id, partition, clock,
                                   holding, activate);
        int err = actor == NULL || take_hit(h, actor, key, source_id) < 0;
        Py_DECREF(key);
        if (err)
            goto done;
    }
    result = Py_NewRef(left);
    goto done;
refuse:
    result = Py_NewRef(Py_None);
done:
    release(hits, taken);
    PyMem_Free(hits);
    Py_XDECREF(left);
    Py_XDECREF(touched);
    return result;
}

/* dedupe_key(prefix, message_id) -> bytes: `gateway.keys.dedupe_key` */
static PyObject *py_dedupe_key(PyObject *self, PyObject *args)
{
    (void)self;
    const char *prefix, *id;
    Py_ssize_t plen, ilen;
    if (!PyArg_ParseTuple(args, "y#s#", &prefix, &plen, &id, &ilen))
        return NULL;
    return dedupe_bytes(prefix, plen, id, ilen);
}

static PyMethodDef methods[] = {
    {"setup", py_setup, METH_VARARGS, "The model's types the kernel checks against."},
    {"take_counted", (PyCFunction)(void (*)(void))py_take_counted, METH_FASTCALL,
     "A record's ledger hits taken into their actors; the positions left, or None."},
    {"user_ids", py_user_ids, METH_O, "Each message's user_id."},
    {"dedupe_key", py_dedupe_key, METH_VARARGS, "gateway.keys.dedupe_key, in C."},
    {"blake2b_16", py_blake2b_16, METH_O, "BLAKE2b with a 16-byte digest."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gateway._route", "The common record's counted calls, in C.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__route(void)
{
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL)
        return NULL;
#define INTERN(var, text)                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL)  \
        return NULL;
    INTERN(s_userId, "userId");
#undef INTERN
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
