/* The common batch's verdict without a Python object per message (gateway/segment.py,
 * `check_batch`; docs/internals.md "The compiled check").
 *
 * fast_check(body) returns the message count n when `body` is a batch that `_FAST.decode`
 * accepts and that is valid UTF-8 (`_check_utf8`), with no message over the size limit: then
 * every message is valid, and `check_batch` returns Checked(n, n, [], None, body). When the
 * batch carries a write key at the top (a string, as the SDKs send it), it returns
 * (n, array, top) (`keyed_parts`), from which `check_batch` reads the key and writes the
 * stored body without it, as its own path does.
 * It returns None for anything else, and `check_batch` decides in Python as it always has.
 * So the rule is one way only: an accept here must be an accept there with the identical
 * verdict; a refusal costs only time. Whatever is rare or subtle is refused rather than
 * matched: escapes in keys, in the type tag or in a timestamp, a known field given twice,
 * integers over 18 digits, a `\u` escape that is half of a surrogate pair, datetimes outside
 * a strict RFC 3339 subset, nesting deeper than MAX_DEPTH.
 *
 * split(body, seed, partitions), below, splits a stored batch body by partition for Redis
 * mode's ingest (gateway/store/redis/partition.py, `split`), by the same one-way rule.
 *
 * The input is untrusted: every read is bounded by `end`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define MAX_BATCH 2500           /* segment.MAX_BATCH */
#define MAX_MESSAGE_BYTES 32768  /* segment.MAX_MESSAGE_BYTES */
#define MAX_MESSAGE_ID 200       /* segment.MAX_MESSAGE_ID, in code points */
#define MAX_DEPTH 32             /* nesting refused beyond this: msgspec recurses */
#define MAX_INT_DIGITS 18        /* fits an int64: msgspec reads it as an int */

typedef const unsigned char *ptr;

/* What a value is, as far as a field's type cares. */
enum {
    V_NULL = 1 << 0,
    V_OBJECT = 1 << 1,
    V_EMPTY = 1 << 2,   /* "" */
    V_STRING = 1 << 3,  /* any other string */
    V_INT = 1 << 4,     /* an integer of at most MAX_INT_DIGITS digits */
    V_OTHER = 1 << 5,   /* array, bool, float */
};

static inline ptr skip_ws(ptr p, ptr end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) p++;
    return p;
}

static inline int hex(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Four hex digits at p (p + 4 <= end checked by the caller), or -1. */
static inline long hex4(ptr p) {
    int a = hex(p[0]), b = hex(p[1]), c = hex(p[2]), d = hex(p[3]);
    if ((a | b | c | d) < 0) return -1;
    return (a << 12) | (b << 8) | (c << 4) | d;
}

/* One UTF-8 sequence at p, whose lead byte is >= 0x80, validated as Python's strict decoder
 * does (no overlongs, no surrogates, nothing above U+10FFFF): the byte after it, or NULL. */
static ptr utf8_char(ptr p, ptr end) {
    unsigned char c = p[0];
    unsigned char lo = 0x80, hi = 0xBF;
    int more;
    if (c >= 0xC2 && c <= 0xDF) {
        more = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        more = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        more = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return NULL;
    }
    if (end - p <= more) return NULL;
    if (p[1] < lo || p[1] > hi) return NULL;
    for (int i = 2; i <= more; i++) {
        if (p[i] < 0x80 || p[i] > 0xBF) return NULL;
    }
    return p + 1 + more;
}

/* `scan_string` past its first 16 bytes, or where they hold more than plain ASCII. */
static ptr scan_string_long(ptr p, ptr end, Py_ssize_t *chars, int *escaped) {
    Py_ssize_t n = 0;
    int esc = 0;
    for (;;) {
#ifdef __SSE2__
        const __m128i quote = _mm_set1_epi8('"');
        const __m128i slash = _mm_set1_epi8('\\');
        const __m128i space = _mm_set1_epi8(0x20);
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            /* signed: the control characters and every byte >= 0x80 are below 0x20 */
            __m128i special = _mm_or_si128(
                _mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, slash)),
                _mm_cmplt_epi8(v, space));
            unsigned mask = (unsigned)_mm_movemask_epi8(special);
            if (mask == 0) {
                p += 16;
                n += 16;
                continue;
            }
            int at = __builtin_ctz(mask);
            p += at;
            n += at;
            break;
        }
#endif
        /* scalar: up to the next byte that needs a look */
        while (p < end && *p >= 0x20 && *p < 0x80 && *p != '"' && *p != '\\') {
            p++;
            n++;
        }
        if (p >= end) return NULL;
        unsigned char c = *p;
        if (c == '"') {
            *chars = n;
            *escaped = esc;
            return p + 1;
        }
        if (c < 0x20) return NULL;  /* a control character must be escaped */
        if (c >= 0x80) {
            p = utf8_char(p, end);
            if (p == NULL) return NULL;
            n++;
            continue;
        }
        /* a backslash */
        esc = 1;
        if (end - p < 2) return NULL;
        switch (p[1]) {
        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
            p += 2;
            n++;
            continue;
        case 'u':
            break;
        default:
            return NULL;
        }
        if (end - p < 6) return NULL;
        long u = hex4(p + 2);
        if (u < 0) return NULL;
        if (u >= 0xDC00 && u <= 0xDFFF) return NULL;  /* a lone low surrogate */
        if (u >= 0xD800 && u <= 0xDBFF) {
            /* only as the first half of a pair */
            if (end - p < 12 || p[6] != '\\' || p[7] != 'u') return NULL;
            long low = hex4(p + 8);
            if (low < 0xDC00 || low > 0xDFFF) return NULL;
            p += 12;
        } else {
            p += 6;
        }
        n++;
    }
}

/* A string whose opening quote is at p[-1]: the byte after its closing quote, or NULL.
 * *chars: its length in code points, as Python's len() of the decoded string;
 * *escaped: whether it holds a backslash. Most strings of a batch (keys, ids, names) end
 * within 16 plain ASCII bytes: one load and two compares. */
static inline ptr scan_string(ptr p, ptr end, Py_ssize_t *chars, int *escaped) {
#ifdef __SSE2__
    if (end - p >= 16) {
        __m128i v = _mm_loadu_si128((const __m128i *)p);
        __m128i quote = _mm_cmpeq_epi8(v, _mm_set1_epi8('"'));
        __m128i special = _mm_or_si128(
            _mm_or_si128(quote, _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))),
            _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)));
        unsigned mask = (unsigned)_mm_movemask_epi8(special);
        if (mask != 0) {
            int at = __builtin_ctz(mask);
            if ((unsigned)_mm_movemask_epi8(quote) & (1u << at)) {
                *chars = at;
                *escaped = 0;
                return p + at + 1;
            }
        }
    }
#endif
    return scan_string_long(p, end, chars, escaped);
}

/* A number at p: the byte after it, or NULL. *kind: V_INT or V_OTHER. JSON's grammar; an
 * integer part of more than MAX_INT_DIGITS digits is refused. */
static ptr scan_number(ptr p, ptr end, int *kind) {
    int is_int = 1;
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        ptr start = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p - start > MAX_INT_DIGITS) return NULL;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        is_int = 0;
        p++;
        ptr start = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        is_int = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        ptr start = p;
        while (p < end && *p >= '0' && *p <= '9') p++;
        if (p == start) return NULL;
    }
    *kind = is_int ? V_INT : V_OTHER;
    return p;
}

static inline ptr literal(ptr p, ptr end, const char *word, size_t size) {
    if ((size_t)(end - p) < size || memcmp(p, word, size) != 0) return NULL;
    return p + size;
}

static ptr skip_value(ptr p, ptr end, int depth, int *kind);

/* An object or array whose opening bracket is at p[-1], its members any JSON. */
static ptr skip_container(ptr p, ptr end, int depth, int object) {
    unsigned char close = object ? '}' : ']';
    int kind;
    p = skip_ws(p, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        if (object) {
            Py_ssize_t chars;
            int escaped;
            if (p >= end || *p != '"') return NULL;
            p = scan_string(p + 1, end, &chars, &escaped);
            if (p == NULL) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
        }
        p = skip_value(p, end, depth, &kind);
        if (p == NULL) return NULL;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == close) return p + 1;
        if (*p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

/* Any JSON value at p (whitespace before it skipped by the caller): the byte after it, or
 * NULL. *kind: what it is (V_*). */
static ptr skip_value(ptr p, ptr end, int depth, int *kind) {
    if (p >= end) return NULL;
    switch (*p) {
    case '"': {
        Py_ssize_t chars;
        int escaped;
        p = scan_string(p + 1, end, &chars, &escaped);
        *kind = chars == 0 ? V_EMPTY : V_STRING;
        return p;
    }
    case '{':
        if (depth >= MAX_DEPTH) return NULL;
        *kind = V_OBJECT;
        return skip_container(p + 1, end, depth + 1, 1);
    case '[':
        if (depth >= MAX_DEPTH) return NULL;
        *kind = V_OTHER;
        return skip_container(p + 1, end, depth + 1, 0);
    case 'n':
        *kind = V_NULL;
        return literal(p, end, "null", 4);
    case 't':
        *kind = V_OTHER;
        return literal(p, end, "true", 4);
    case 'f':
        *kind = V_OTHER;
        return literal(p, end, "false", 5);
    default:
        return scan_number(p, end, kind);
    }
}

/* Digits at p..p+count, as a number, or -1. */
static inline int digits(ptr p, int count) {
    int value = 0;
    for (int i = 0; i < count; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        value = value * 10 + (p[i] - '0');
    }
    return value;
}

/* Whether [p, q) is a datetime msgspec reads: of its RFC 3339 forms only
 * YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|+HH:MM|-HH:MM) or the same without an offset, every part in
 * range (the day in its month, leap years). More fraction digits, lowercase letters, a space
 * for the T: refused, msgspec decides. */
static int datetime_ok(ptr p, ptr q) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    Py_ssize_t size = q - p;
    if (size < 19) return 0;
    if (p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' || p[16] != ':') return 0;
    int year = digits(p, 4), month = digits(p + 5, 2), day = digits(p + 8, 2);
    int hour = digits(p + 11, 2), minute = digits(p + 14, 2), second = digits(p + 17, 2);
    if (year < 1 || month < 1 || month > 12 || day < 1) return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > days[month - 1] + (month == 2 && leap)) return 0;
    if (hour < 0 || hour > 23 || minute < 0 || minute > 59 || second < 0 || second > 59)
        return 0;
    p += 19;
    if (p < q && *p == '.') {
        ptr start = ++p;
        while (p < q && *p >= '0' && *p <= '9') p++;
        if (p == start || p - start > 6) return 0;
    }
    if (p == q) return 1;  /* no offset: msgspec reads a naive datetime */
    if (*p == 'Z') return p + 1 == q;
    if (*p != '+' && *p != '-') return 0;
    if (q - p != 6 || p[3] != ':') return 0;
    int oh = digits(p + 1, 2), om = digits(p + 4, 2);
    return oh >= 0 && oh <= 23 && om >= 0 && om <= 59;
}

/* A datetime or null at p: the byte after it, or NULL. */
static ptr datetime_or_null(ptr p, ptr end) {
    if (p < end && *p == 'n') return literal(p, end, "null", 4);
    if (p >= end || *p != '"') return NULL;
    Py_ssize_t chars;
    int escaped;
    ptr q = scan_string(p + 1, end, &chars, &escaped);
    if (q == NULL || escaped || !datetime_ok(p + 1, q - 1)) return NULL;
    return q;
}

/* An object or null at p. */
static ptr object_or_null(ptr p, ptr end, int depth) {
    int kind;
    if (p >= end || (*p != '{' && *p != 'n')) return NULL;
    return skip_value(p, end, depth, &kind);
}

/* The known keys of a message: a bit each, for duplicates and for the per-type rules. */
enum {
    K_TYPE, K_MESSAGE_ID, K_USER_ID, K_ANONYMOUS_ID, K_TIMESTAMP, K_ORIGINAL_TIMESTAMP,
    K_SENT_AT, K_CONTEXT, K_INTEGRATIONS, K_WRITE_KEY, K_TRAITS, K_GROUP_ID, K_EVENT,
    K_PROPERTIES, K_NAME, K_CATEGORY, K_PREVIOUS_ID, K_UNKNOWN
};

#define KEY(text) (sizeof(text) - 1 == size && memcmp(key, text, size) == 0)

static int message_key(ptr key, Py_ssize_t size) {
    switch (size) {
    case 4:
        if (KEY("type")) return K_TYPE;
        if (KEY("name")) return K_NAME;
        break;
    case 5:
        if (KEY("event")) return K_EVENT;
        break;
    case 6:
        if (KEY("userId")) return K_USER_ID;
        if (KEY("traits")) return K_TRAITS;
        if (KEY("sentAt")) return K_SENT_AT;
        break;
    case 7:
        if (KEY("context")) return K_CONTEXT;
        if (KEY("groupId")) return K_GROUP_ID;
        break;
    case 8:
        if (KEY("writeKey")) return K_WRITE_KEY;
        if (KEY("category")) return K_CATEGORY;
        break;
    case 9:
        if (KEY("messageId")) return K_MESSAGE_ID;
        if (KEY("timestamp")) return K_TIMESTAMP;
        break;
    case 10:
        if (KEY("properties")) return K_PROPERTIES;
        if (KEY("previousId")) return K_PREVIOUS_ID;
        break;
    case 11:
        if (KEY("anonymousId")) return K_ANONYMOUS_ID;
        break;
    case 12:
        if (KEY("integrations")) return K_INTEGRATIONS;
        break;
    case 17:
        if (KEY("originalTimestamp")) return K_ORIGINAL_TIMESTAMP;
        break;
    }
    return K_UNKNOWN;
}

enum { T_IDENTIFY, T_GROUP, T_TRACK, T_PAGE, T_SCREEN, T_ALIAS, T_NONE };

static int message_type(ptr text, Py_ssize_t size) {
    ptr key = text;
    switch (size) {
    case 4:
        if (KEY("page")) return T_PAGE;
        break;
    case 5:
        if (KEY("track")) return T_TRACK;
        if (KEY("group")) return T_GROUP;
        if (KEY("alias")) return T_ALIAS;
        break;
    case 6:
        if (KEY("screen")) return T_SCREEN;
        break;
    case 8:
        if (KEY("identify")) return T_IDENTIFY;
        break;
    }
    return T_NONE;
}

#define NONEMPTY_OR_INT (V_STRING | V_INT)
#define OBJECT_OR_NULL (V_OBJECT | V_NULL)
#define STRING_OR_NULL (V_STRING | V_EMPTY | V_NULL)

/* An object's member at p, from its key's '"': the start of its value (whitespace skipped),
 * or NULL. *key, *size: the key's bytes; a key with an escape is refused. */
static inline ptr member_key(ptr p, ptr end, ptr *key, Py_ssize_t *size) {
    Py_ssize_t chars;
    int escaped;
    if (p >= end || *p != '"') return NULL;
    *key = p + 1;
    p = scan_string(p + 1, end, &chars, &escaped);
    if (p == NULL || escaped) return NULL;
    *size = p - 1 - *key;
    p = skip_ws(p, end);
    if (p >= end || *p != ':') return NULL;
    return skip_ws(p + 1, end);
}

/* After a member's value (p; NULL where it failed): the next member's key, or at the
 * object's end the byte after its '}' with *closed set; NULL for anything else. */
static inline ptr member_next(ptr p, ptr end, int *closed) {
    if (p == NULL) return NULL;
    p = skip_ws(p, end);
    if (p >= end) return NULL;
    if (*p == '}') {
        *closed = 1;
        return p + 1;
    }
    if (*p != ',') return NULL;
    return skip_ws(p + 1, end);
}

/* One message, whose '{' is at p: the byte after its '}', or NULL. As a `_Fast*` type reads
 * it: the tag anywhere, userId a non-empty string or an int, no writeKey but null. */
static ptr message(ptr p, ptr end) {
    ptr start = p;
    unsigned seen = 0;
    int kinds[K_UNKNOWN];
    int type = T_NONE;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return NULL;  /* no type, no userId */
    for (int closed = 0; !closed;) {
        Py_ssize_t chars, size;
        int escaped, kind;
        ptr key;
        p = member_key(p, end, &key, &size);
        if (p == NULL) return NULL;
        int k = message_key(key, size);
        if (k != K_UNKNOWN) {
            if (seen & (1u << k)) return NULL;
            seen |= 1u << k;
        }
        switch (k) {
        case K_TYPE: {
            if (p >= end || *p != '"') return NULL;
            ptr text = p + 1;
            p = scan_string(text, end, &chars, &escaped);
            if (p == NULL || escaped) return NULL;
            type = message_type(text, p - 1 - text);
            if (type == T_NONE) return NULL;
            break;
        }
        case K_TIMESTAMP:
        case K_ORIGINAL_TIMESTAMP:
        case K_SENT_AT:
            p = datetime_or_null(p, end);
            break;
        case K_CONTEXT:
        case K_INTEGRATIONS:
            p = object_or_null(p, end, 2);
            break;
        case K_WRITE_KEY:
            p = literal(p, end, "null", 4);
            break;
        case K_MESSAGE_ID:
            if (p < end && *p == '"') {
                p = scan_string(p + 1, end, &chars, &escaped);
                if (chars > MAX_MESSAGE_ID) return NULL;
            } else {
                p = literal(p, end, "null", 4);
            }
            break;
        default:
            p = skip_value(p, end, 2, &kind);
            if (k != K_UNKNOWN) kinds[k] = kind;
            break;
        }
        p = member_next(p, end, &closed);
        if (p == NULL) return NULL;
    }
    if (p - start > MAX_MESSAGE_BYTES) return NULL;  /* `_stored` decides message by message */
    if (type == T_NONE || !(seen & (1u << K_USER_ID))) return NULL;
    if (!(kinds[K_USER_ID] & NONEMPTY_OR_INT)) return NULL;
    if ((seen & (1u << K_ANONYMOUS_ID)) &&
        !(kinds[K_ANONYMOUS_ID] & (V_STRING | V_EMPTY | V_INT | V_NULL)))
        return NULL;
    /* the type's own fields: required ones present, every one of the right kind */
#define HAS(k) (seen & (1u << (k)))
#define BAD(k, allowed) (HAS(k) && !(kinds[k] & (allowed)))
    switch (type) {
    case T_IDENTIFY:
        if (BAD(K_TRAITS, OBJECT_OR_NULL)) return NULL;
        break;
    case T_GROUP:
        if (!HAS(K_GROUP_ID) || BAD(K_GROUP_ID, NONEMPTY_OR_INT)) return NULL;
        if (BAD(K_TRAITS, OBJECT_OR_NULL)) return NULL;
        break;
    case T_TRACK:
        if (!HAS(K_EVENT) || BAD(K_EVENT, V_STRING)) return NULL;
        if (BAD(K_PROPERTIES, OBJECT_OR_NULL)) return NULL;
        break;
    case T_PAGE:
    case T_SCREEN:
        if (BAD(K_NAME, STRING_OR_NULL) || BAD(K_CATEGORY, STRING_OR_NULL)) return NULL;
        if (BAD(K_PROPERTIES, OBJECT_OR_NULL)) return NULL;
        break;
    case T_ALIAS:
        if (!HAS(K_PREVIOUS_ID) || BAD(K_PREVIOUS_ID, NONEMPTY_OR_INT)) return NULL;
        break;
    }
#undef HAS
#undef BAD
    return p;
}

/* The batch's array, whose '[' is at p: the byte after its ']', or NULL. *count: its size. */
static ptr batch(ptr p, ptr end, Py_ssize_t *count, ptr *spans) {
    Py_ssize_t n = 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        *count = 0;
        return p + 1;
    }
    for (;;) {
        if (p >= end || *p != '{') return NULL;
        if (n == MAX_BATCH) return NULL;
        spans[2 * n] = p;
        p = message(p, end);
        if (p == NULL) return NULL;
        spans[2 * n + 1] = p;
        n++;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == ']') {
            *count = n;
            return p + 1;
        }
        if (*p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

/* What `body_count` found besides the count: whether the body holds a write key (a string),
 * where its batch array is, and where each message starts and ends. */
typedef struct {
    int keyed;
    ptr array_start, array_end;
    ptr spans[2 * MAX_BATCH];
} Found;

/* The whole body: the batch's size, or -1. */
static Py_ssize_t body_count(ptr p, ptr end, Found *found) {
    Py_ssize_t count = -1;
    int keyed = 0;
    int seen_context = 0, seen_integrations = 0, seen_sent_at = 0, seen_write_key = 0;
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return -1;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return -1;  /* no batch */
    for (int closed = 0; !closed;) {
        Py_ssize_t chars, size;
        int escaped, kind;
        ptr key;
        p = member_key(p, end, &key, &size);
        if (p == NULL) return -1;
        if (KEY("batch")) {
            if (count >= 0 || p >= end || *p != '[') return -1;
            found->array_start = p;
            p = batch(p, end, &count, found->spans);
            found->array_end = p;
        } else if (KEY("context") || KEY("integrations")) {
            int *seen = KEY("context") ? &seen_context : &seen_integrations;
            if (*seen) return -1;
            *seen = 1;
            p = object_or_null(p, end, 1);
        } else if (KEY("sentAt")) {
            if (seen_sent_at) return -1;
            seen_sent_at = 1;
            p = datetime_or_null(p, end);
        } else if (KEY("writeKey")) {
            /* a string or null; Python reads the key and strips it from the stored body */
            if (seen_write_key || p >= end) return -1;
            seen_write_key = 1;
            if (*p == '"') {
                keyed = 1;
                p = scan_string(p + 1, end, &chars, &escaped);
            } else {
                p = literal(p, end, "null", 4);
            }
        } else {
            p = skip_value(p, end, 1, &kind);
        }
        p = member_next(p, end, &closed);
        if (p == NULL) return -1;
    }
    if (skip_ws(p, end) != end) return -1;  /* trailing content */
    found->keyed = keyed;
    return count;
}

#undef KEY

/* For a body with a write key at the top: (count, array, top), `array` the batch's messages
 * as msgspec writes a list of them ("[m1,m2]", no whitespace), `top` the body with its batch
 * array emptied ("[]"), for Python to read the key from and write the stored body. */
static PyObject *keyed_parts(Py_ssize_t count, ptr start, ptr end, const Found *found) {
    Py_ssize_t size = 2 + (count > 0 ? count - 1 : 0);
    for (Py_ssize_t i = 0; i < count; i++) size += found->spans[2 * i + 1] - found->spans[2 * i];
    PyObject *array = PyBytes_FromStringAndSize(NULL, size);
    if (array == NULL) return NULL;
    char *w = PyBytes_AS_STRING(array);
    *w++ = '[';
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i > 0) *w++ = ',';
        Py_ssize_t length = found->spans[2 * i + 1] - found->spans[2 * i];
        memcpy(w, found->spans[2 * i], length);
        w += length;
    }
    *w = ']';
    Py_ssize_t head = found->array_start - start, tail = end - found->array_end;
    PyObject *top = PyBytes_FromStringAndSize(NULL, head + 2 + tail);
    if (top == NULL) {
        Py_DECREF(array);
        return NULL;
    }
    w = PyBytes_AS_STRING(top);
    memcpy(w, start, head);
    memcpy(w + head, "[]", 2);
    memcpy(w + head + 2, found->array_end, tail);
    return Py_BuildValue("(nNN)", count, array, top);
}

static PyObject *fast_check(PyObject *module, PyObject *body) {
    (void)module;
    if (!PyBytes_Check(body)) {
        PyErr_Format(PyExc_TypeError, "fast_check() takes bytes, not %.100s",
                     Py_TYPE(body)->tp_name);
        return NULL;
    }
    ptr start = (ptr)PyBytes_AS_STRING(body);
    ptr end = start + PyBytes_GET_SIZE(body);
    Found *found = PyMem_Malloc(sizeof(Found));
    if (found == NULL) return PyErr_NoMemory();
    PyObject *out = NULL;
    Py_ssize_t count = body_count(start, end, found);
    if (count < 0) {
        out = Py_NewRef(Py_None);
    } else if (!found->keyed) {
        out = PyLong_FromSsize_t(count);
    } else {
        out = keyed_parts(count, start, end, found);
    }
    PyMem_Free(found);
    return out;
}

/* --- split: a stored batch body, one part per partition (gateway/store/redis/partition.py,
 * `split`). The same one-way rule as `fast_check`: a body taken here is split exactly as
 * `_split` splits it, byte for byte and in the same order; whatever is rare is refused
 * (None) and `_split` decides: an escape in a key or an id, an id given twice or that is a
 * float, an object, an array or an integer over 18 digits, a top-level field given twice,
 * nesting deeper than MAX_DEPTH, more than MAX_BATCH messages. */

/* CRC-32 as zlib computes it (the reflected polynomial 0xEDB88320): constant, filled once
 * when the module loads. */
static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
        crc_table[i] = c;
    }
}

/* zlib.crc32(data, crc) */
static uint32_t crc32_of(ptr p, Py_ssize_t size, uint32_t crc) {
    crc = ~crc;
    for (Py_ssize_t i = 0; i < size; i++) crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* An id at p, as `id_str` renders it: the byte after it, or NULL to refuse. *size: 0 where
 * it is no id (null, a bool, ""), else the bytes of its text at *text (a string's UTF-8,
 * an integer's digits, -0 as 0). */
static ptr id_value(ptr p, ptr end, ptr *text, Py_ssize_t *size) {
    *size = 0;
    if (p >= end || *p == '{' || *p == '[') return NULL;
    if (*p == '"') {
        Py_ssize_t chars;
        int escaped;
        ptr q = scan_string(p + 1, end, &chars, &escaped);
        if (q == NULL || escaped) return NULL;
        *text = p + 1;
        *size = q - 1 - (p + 1);
        return q;
    }
    int kind;
    ptr q = skip_value(p, end, 0, &kind);
    if (q == NULL || kind == V_NULL) return q;
    if (kind != V_INT) return *p == 't' || *p == 'f' ? q : NULL;  /* a bool; a float */
    *text = p;
    *size = q - p;
    if (*size == 2 && p[0] == '-' && p[1] == '0') {  /* str(int("-0")) == "0" */
        *text = p + 1;
        *size = 1;
    }
    return q;
}

#define KEY(text) (sizeof(text) - 1 == size && memcmp(key, text, size) == 0)

/* One message whose '{' is at p: the byte after its '}', or NULL. *text, *size: its
 * partition key (userId, else anonymousId), *size 0 where it has none. */
static ptr message_ids(ptr p, ptr end, ptr *text, Py_ssize_t *size_out) {
    ptr user = NULL, anonymous = NULL;
    Py_ssize_t user_size = 0, anonymous_size = 0;
    int seen_user = 0, seen_anonymous = 0;
    *size_out = 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return p + 1;
    for (int closed = 0; !closed;) {
        Py_ssize_t size;
        int kind;
        ptr key;
        p = member_key(p, end, &key, &size);
        if (p == NULL) return NULL;
        if (KEY("userId")) {
            if (seen_user) return NULL;
            seen_user = 1;
            p = id_value(p, end, &user, &user_size);
        } else if (KEY("anonymousId")) {
            if (seen_anonymous) return NULL;
            seen_anonymous = 1;
            p = id_value(p, end, &anonymous, &anonymous_size);
        } else {
            p = skip_value(p, end, 2, &kind);
        }
        p = member_next(p, end, &closed);
        if (p == NULL) return NULL;
    }
    if (user_size > 0) {
        *text = user;
        *size_out = user_size;
    } else if (anonymous_size > 0) {
        *text = anonymous;
        *size_out = anonymous_size;
    }
    return p;
}

/* The top-level fields every part carries, in the order `_Body` writes them. */
enum { F_CONTEXT, F_INTEGRATIONS, F_SENT_AT, F_COUNT };
static const char *const field_heads[F_COUNT] = {
    ",\"context\":", ",\"integrations\":", ",\"sentAt\":"};

typedef struct {
    Py_ssize_t count;
    ptr fields[F_COUNT][2];       /* each field's value, start and end; NULL if absent */
    ptr spans[2 * MAX_BATCH];     /* each message, start and end */
    uint32_t where[MAX_BATCH];    /* each message's partition */
} Split;

/* The batch's array, whose '[' is at p: the byte after its ']', or NULL. */
static ptr split_batch(ptr p, ptr end, uint32_t seed, uint32_t partitions, Split *out) {
    Py_ssize_t n = 0;
    p = skip_ws(p + 1, end);
    if (p < end && *p == ']') {
        out->count = 0;
        return p + 1;
    }
    for (;;) {
        int kind;
        ptr text = NULL;
        Py_ssize_t size = 0;
        if (n == MAX_BATCH) return NULL;
        out->spans[2 * n] = p;
        if (p < end && *p == '{') {
            p = message_ids(p, end, &text, &size);
        } else {
            p = skip_value(p, end, 1, &kind);  /* not a message: no ids, partition 0 */
        }
        if (p == NULL) return NULL;
        out->spans[2 * n + 1] = p;
        out->where[n] = size > 0 ? crc32_of(text, size, seed) % partitions : 0;
        n++;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == ']') {
            out->count = n;
            return p + 1;
        }
        if (*p != ',') return NULL;
        p = skip_ws(p + 1, end);
    }
}

/* The whole body: 0, or -1 to refuse. */
static int split_body(ptr p, ptr end, uint32_t seed, uint32_t partitions, Split *out) {
    int seen_batch = 0;
    memset(out->fields, 0, sizeof(out->fields));
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return -1;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') return -1;  /* no batch */
    for (int closed = 0; !closed;) {
        Py_ssize_t size;
        int kind, field = -1;
        ptr key;
        p = member_key(p, end, &key, &size);
        if (p == NULL) return -1;
        if (KEY("batch")) {
            if (seen_batch || p >= end || *p != '[') return -1;
            seen_batch = 1;
            p = split_batch(p, end, seed, partitions, out);
        } else {
            if (KEY("context")) field = F_CONTEXT;
            else if (KEY("integrations")) field = F_INTEGRATIONS;
            else if (KEY("sentAt")) field = F_SENT_AT;
            if (field >= 0) {
                if (out->fields[field][0] != NULL) return -1;
                out->fields[field][0] = p;
            }
            p = skip_value(p, end, 1, &kind);
            if (field >= 0) out->fields[field][1] = p;
        }
        p = member_next(p, end, &closed);
        if (p == NULL) return -1;
    }
    if (!seen_batch || skip_ws(p, end) != end) return -1;
    return 0;
}

#undef KEY

/* One part: the messages at `order[0..messages)` (the batch's indexes, in order), as
 * `_Body` encodes them. */
static PyObject *part_bytes(const Split *s, const uint32_t *order, Py_ssize_t messages) {
    static const char head[] = "{\"batch\":[";
    Py_ssize_t size = sizeof(head) - 1 + (messages - 1) + 2;
    for (Py_ssize_t k = 0; k < messages; k++)
        size += s->spans[2 * order[k] + 1] - s->spans[2 * order[k]];
    for (int f = 0; f < F_COUNT; f++)
        if (s->fields[f][0] != NULL)
            size += (Py_ssize_t)strlen(field_heads[f]) + (s->fields[f][1] - s->fields[f][0]);
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) return NULL;
    char *w = PyBytes_AS_STRING(out);
    memcpy(w, head, sizeof(head) - 1);
    w += sizeof(head) - 1;
    for (Py_ssize_t k = 0; k < messages; k++) {
        if (k > 0) *w++ = ',';
        Py_ssize_t length = s->spans[2 * order[k] + 1] - s->spans[2 * order[k]];
        memcpy(w, s->spans[2 * order[k]], length);
        w += length;
    }
    *w++ = ']';
    for (int f = 0; f < F_COUNT; f++) {
        if (s->fields[f][0] == NULL) continue;
        size_t head_size = strlen(field_heads[f]);
        memcpy(w, field_heads[f], head_size);
        w += head_size;
        Py_ssize_t length = s->fields[f][1] - s->fields[f][0];
        memcpy(w, s->fields[f][0], length);
        w += length;
    }
    *w = '}';
    return out;
}

/* out[partition] = (part, messages); a new reference to `part` is taken. */
static int put_part(PyObject *out, uint32_t partition, PyObject *part, Py_ssize_t messages) {
    if (part == NULL) return -1;
    PyObject *key = PyLong_FromUnsignedLong(partition);
    PyObject *count = PyLong_FromSsize_t(messages);
    PyObject *value = key == NULL || count == NULL ? NULL : PyTuple_Pack(2, part, count);
    int failed = value == NULL || PyDict_SetItem(out, key, value) < 0;
    Py_XDECREF(key);
    Py_XDECREF(count);
    Py_XDECREF(value);
    return failed ? -1 : 0;
}

/* {partition: (part, messages)} from a scanned body. */
static PyObject *split_parts(PyObject *body, const Split *s, uint32_t partitions) {
    PyObject *out = PyDict_New();
    if (out == NULL) return NULL;
    Py_ssize_t n = s->count;
    uint32_t first = n > 0 ? s->where[0] : 0;
    Py_ssize_t i = 1;
    while (i < n && s->where[i] == first) i++;
    if (i >= n) {  /* one partition: the body as it is */
        if (put_part(out, first, body, n) < 0) Py_CLEAR(out);
        return out;
    }
    /* groups numbered by first appearance, as `_split`'s dict orders them; then the
     * batch's indexes grouped (a counting sort, stable: each part keeps the batch's order) */
    uint32_t *slot = PyMem_Calloc(partitions, sizeof(uint32_t));  /* group + 1, 0: none yet */
    uint32_t *group_of = PyMem_Malloc(sizeof(uint32_t) * (size_t)n);
    uint32_t *order = PyMem_Malloc(sizeof(uint32_t) * (size_t)n);
    uint32_t *head = PyMem_Calloc((size_t)n + 1, sizeof(uint32_t));  /* each group's start */
    uint32_t *partition_of = PyMem_Malloc(sizeof(uint32_t) * (size_t)n);
    uint32_t groups = 0;
    if (slot == NULL || group_of == NULL || order == NULL || head == NULL ||
        partition_of == NULL) {
        PyErr_NoMemory();
        Py_CLEAR(out);
        goto done;
    }
    for (i = 0; i < n; i++) {
        uint32_t p = s->where[i];
        if (slot[p] == 0) {
            partition_of[groups] = p;
            slot[p] = ++groups;
        }
        group_of[i] = slot[p] - 1;
        head[group_of[i] + 1]++;
    }
    for (uint32_t g = 0; g < groups; g++) head[g + 1] += head[g];
    for (i = 0; i < n; i++) order[head[group_of[i]]++] = (uint32_t)i;
    /* head[g] is now group g's end, which is group g + 1's start */
    for (uint32_t g = 0; g < groups; g++) {
        uint32_t from = g == 0 ? 0 : head[g - 1];
        Py_ssize_t messages = head[g] - from;
        PyObject *part = part_bytes(s, order + from, messages);
        int failed = put_part(out, partition_of[g], part, messages);
        Py_XDECREF(part);
        if (failed) {
            Py_CLEAR(out);
            break;
        }
    }
done:
    PyMem_Free(slot);
    PyMem_Free(group_of);
    PyMem_Free(order);
    PyMem_Free(head);
    PyMem_Free(partition_of);
    return out;
}

/* The partition counts taken here: `Settings.partitions` is at most 2**14. */
#define MAX_PARTITIONS (1u << 16)

static PyObject *split(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "split() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *body = args[0];
    if (!PyBytes_Check(body)) {
        PyErr_Format(PyExc_TypeError, "split() takes bytes, not %.100s",
                     Py_TYPE(body)->tp_name);
        return NULL;
    }
    unsigned long seed = PyLong_AsUnsignedLong(args[1]);
    if (seed == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    long partitions = PyLong_AsLong(args[2]);
    if (partitions == -1 && PyErr_Occurred()) return NULL;
    if (seed > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_OverflowError, "split(): the seed is a CRC-32, under 2**32");
        return NULL;
    }
    if (partitions < 1 || (unsigned long)partitions > MAX_PARTITIONS) Py_RETURN_NONE;
    ptr start = (ptr)PyBytes_AS_STRING(body);
    ptr end = start + PyBytes_GET_SIZE(body);
    Split *s = PyMem_Malloc(sizeof(Split));
    if (s == NULL) return PyErr_NoMemory();
    PyObject *out;
    if (split_body(start, end, (uint32_t)seed, (uint32_t)partitions, s) < 0) {
        out = Py_NewRef(Py_None);
    } else {
        out = split_parts(body, s, (uint32_t)partitions);
    }
    PyMem_Free(s);
    return out;
}

static PyMethodDef methods[] = {
    {"fast_check", fast_check, METH_O,
     "fast_check(body: bytes) -> int | tuple[int, bytes, bytes] | None\n\n"
     "The message count n when `body` is a batch whose every message check_batch\n"
     "accepts; (n, array, top) when it also has a write key at the top, for check_batch\n"
     "to read and strip. None: let check_batch decide."},
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(body: bytes, seed: int, partitions: int) -> dict[int, tuple[bytes, int]] | None\n\n"
     "A stored batch body as one body per partition, with how many messages each holds,\n"
     "as gateway/store/redis/partition.py's `_split` makes them; `seed` is the source's\n"
     "CRC-32 (`_seed`). None: let `_split` decide."},
    {NULL, NULL, 0, NULL},
};


static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "gateway._check",
    "A compiled check of the common batch (gateway/segment.py, check_batch).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__check(void) {
    crc_init();
    return PyModule_Create(&module_def);
}
