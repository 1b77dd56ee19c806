/*
 * Optional C versions of the http1 codec's hot paths: the head serialisers,
 * and in the head parsers the splitting of a head into lines, the request
 * line and the header-line loop.
 *
 * This file mirrors parser.py, which stays the reference:
 * tests/extensions/codecs/http1/test_speedups.py feeds generated heads (bad
 * bytes, CR/LF/NUL, latin-1, empty and long values) to both and requires
 * identical results or identical exceptions, and every codec test runs with
 * both. parser.py picks these at import time unless OUTRIDER_NO_SPEEDUPS=1.
 *
 * read_fields is parser._py_read_fields (the header loop of the head and
 * trailer parsers), line for line: the same lookups in parser.py's own line
 * caches, and parser._new_field (Python) for a line missing from them, so
 * parsing, checking, caching and every error stay in Python.
 *
 * split_head is parser._py_split_head (decode as latin-1, split at CRLFs)
 * without its two intermediate copies; it has no error cases of its own.
 * request_line accepts only the common shape (exactly two spaces, a token
 * method, a target of printable ASCII without '#', HTTP/1.1 or HTTP/1.0) and
 * hands every other line to parser._py_request_line, which raises the
 * errors. The run loop around them (finding the CRLFCRLF, size limits, the
 * bad-character checks of _check_block and _unterminated) stays in Python:
 * the tests feed whole streams cut at random places through both.
 *
 * The serialisers handle only the common case: exact str method, path,
 * authority, reason, names and values holding latin-1 text; headers a list
 * (or a list subclass that does not override iteration) of exact 2-tuples;
 * names that are tokens; no CR, LF or NUL anywhere. For anything else
 * (subclasses, whose formatting may differ; non-latin-1 text; any invalid
 * input) the Python version is called on the same head, so every error
 * message and every rare case comes from the one readable implementation.
 * Serialising is pure apart from the shared cache of validated names, so
 * running the Python version after a partial C pass is harmless.
 *
 * Each head is measured (and checked) first, then copied into a bytes
 * object of exactly that size. Normally no Python code can run in between,
 * but a str subclass put in the shared name set by the Python version has an
 * __eq__ that could edit the headers while a name is looked up: so fields
 * are held while measured, re-checked while copied, and the copy is bounded
 * by the measured size (a mismatch hands the head to Python).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Set once by configure() from parser.py. */
static PyObject *field_cache;          /* parser._FIELD_CACHE (dict line -> (name, value)) */
static PyObject *special_cache;        /* parser._SPECIAL_CACHE */
static PyObject *new_field;            /* parser._new_field(line, status) */
static PyObject *headers_type;         /* outrider.http.message.Headers */
static PyObject *py_request_line;      /* parser._py_request_line */
static PyObject *py_request_fallback;  /* parser._py_serialize_request_head */
static PyObject *py_response_fallback; /* parser._py_serialize_response_head */
static PyObject *out_names;            /* parser._OUT_NAMES (set, shared) */
static PyObject *reasons;              /* parser._REASONS (dict int -> str) */
static Py_ssize_t name_cache_max;      /* parser._CACHE_MAX */

static PyObject *str_method, *str_path, *str_authority, *str_headers, *str_status, *str_reason;
static PyObject *str_http11, *str_http10;

/* RFC 9110 5.6.2 tchar, as parser._TCHAR. */
static unsigned char is_tchar[256];

static void
init_tchar(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) is_tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) is_tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) is_tchar[c] = 1;
    for (const char *p = extra; *p; p++) is_tchar[(unsigned char)*p] = 1;
}

/* Nonzero if s is an exact str whose characters all fit in one byte
 * (latin-1: what the Python version can encode). */
static int
is_latin1_str(PyObject *s)
{
#if PY_VERSION_HEX < 0x030C0000
    /* Before 3.12 a str made by the legacy wchar API may not be ready. */
    if (PyUnicode_CheckExact(s) && !PyUnicode_IS_READY(s)) return 0;
#endif
    return PyUnicode_CheckExact(s) && PyUnicode_KIND(s) == PyUnicode_1BYTE_KIND;
}

/* Nonzero if the latin-1 text holds CR, LF or NUL (_finish's check). */
static int
has_line_break(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if (c == '\r' || c == '\n' || c == 0) return 1;
    }
    return 0;
}

static int
is_token(const unsigned char *p, Py_ssize_t n)
{
    if (n == 0) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_tchar[p[i]]) return 0;
    }
    return 1;
}

/* Adds n to *total; fails on overflow (only possible with absurd input). */
static int
add_size(Py_ssize_t *total, Py_ssize_t n)
{
    if (n > PY_SSIZE_T_MAX - *total) return 0;
    *total += n;
    return 1;
}

/* A string that passed is_latin1_str and has no CR/LF/NUL; adds its length. */
static int
measure_text(PyObject *s, Py_ssize_t *total)
{
    if (!is_latin1_str(s)) return 0;
    if (has_line_break(PyUnicode_1BYTE_DATA(s), PyUnicode_GET_LENGTH(s))) return 0;
    return add_size(total, PyUnicode_GET_LENGTH(s));
}

/* Nonzero if headers can be walked by index exactly as Python's for loop
 * would walk it. */
static int
is_plain_list(PyObject *headers)
{
    return PyList_Check(headers) && Py_TYPE(headers)->tp_iter == PyList_Type.tp_iter;
}

/* measure_fields for one field. */
static int
measure_field(PyObject *field, Py_ssize_t *total)
{
    if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2) return 0;
    PyObject *name = PyTuple_GET_ITEM(field, 0);
    PyObject *value = PyTuple_GET_ITEM(field, 1);
    if (!is_latin1_str(name)) return 0;
    int known = PySet_Contains(out_names, name);
    if (known < 0) return -1;
    if (!known) {
        if (!is_token(PyUnicode_1BYTE_DATA(name), PyUnicode_GET_LENGTH(name))) return 0;
        if (PySet_GET_SIZE(out_names) < name_cache_max && PySet_Add(out_names, name) < 0) return -1;
    }
    /* Names are tokens here, so they need no CR/LF/NUL check. */
    if (!add_size(total, PyUnicode_GET_LENGTH(name))) return 0;
    if (!measure_text(value, total)) return 0;
    return add_size(total, 4); /* ": " and CRLF */
}

/*
 * Checks every (name, value) and adds "name: value\r\n" per field to *total.
 * Returns 1 when all is common-case, 0 to hand over to Python, -1 on error.
 * Valid names missing from out_names are added, as _check_out_name does.
 */
static int
measure_fields(PyObject *headers, Py_ssize_t *total)
{
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(headers); i++) {
        /* Held: a set member's __eq__ (a str subclass put in out_names by
         * the Python version) could run code that edits the list. */
        PyObject *field = PyList_GET_ITEM(headers, i);
        Py_INCREF(field);
        int ok = measure_field(field, total);
        Py_DECREF(field);
        if (ok != 1) return ok;
    }
    return 1;
}

/* Output cursor that never writes past the measured end. */
typedef struct {
    char *p;
    char *end;
} Writer;

static int
put(Writer *w, const void *data, Py_ssize_t n)
{
    if (n > w->end - w->p) return 0;
    memcpy(w->p, data, (size_t)n);
    w->p += n;
    return 1;
}

static int
put_str(Writer *w, PyObject *s)
{
    return put(w, PyUnicode_1BYTE_DATA(s), PyUnicode_GET_LENGTH(s));
}

static int
put_fields(Writer *w, PyObject *headers, Py_ssize_t count)
{
    if (PyList_GET_SIZE(headers) != count) return 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field = PyList_GET_ITEM(headers, i);
        /* Re-checked so that a list edited since measuring cannot make us
         * read a non-str as text; the writer bounds the lengths. */
        if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2 ||
            !is_latin1_str(PyTuple_GET_ITEM(field, 0)) || !is_latin1_str(PyTuple_GET_ITEM(field, 1)))
            return 0;
        if (!put_str(w, PyTuple_GET_ITEM(field, 0)) || !put(w, ": ", 2) ||
            !put_str(w, PyTuple_GET_ITEM(field, 1)) || !put(w, "\r\n", 2))
            return 0;
    }
    return 1;
}

/* Calls the Python implementation (exact results and errors). */
static PyObject *
fall_back(PyObject *fallback, PyObject *head)
{
    if (fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() was not called");
        return NULL;
    }
    return PyObject_CallOneArg(fallback, head);
}

/* Fetches head.<attr> into *out (new reference); 0 on error. */
static int
get_attrs(PyObject *head, PyObject **names, PyObject **out, int n)
{
    for (int i = 0; i < n; i++) {
        out[i] = PyObject_GetAttr(head, names[i]);
        if (out[i] == NULL) {
            for (int j = 0; j < i; j++) Py_CLEAR(out[j]);
            return 0;
        }
    }
    return 1;
}

static void
drop_attrs(PyObject **attrs, int n)
{
    for (int i = 0; i < n; i++) Py_CLEAR(attrs[i]);
}

/* "METHOD path HTTP/1.1\r\nhost: authority\r\n" + fields + "\r\n". */
static PyObject *
serialize_request_head(PyObject *module, PyObject *head)
{
    enum { METHOD, PATH, AUTHORITY, HEADERS, N };
    PyObject *names[N] = {str_method, str_path, str_authority, str_headers};
    PyObject *a[N];
    PyObject *result = NULL;
    if (!get_attrs(head, names, a, N)) return NULL;

    Py_ssize_t total = 0;
    int ok = is_latin1_str(a[METHOD]) && is_latin1_str(a[PATH]) && is_plain_list(a[HEADERS]);
    if (ok) {
        const unsigned char *path = PyUnicode_1BYTE_DATA(a[PATH]);
        Py_ssize_t path_len = PyUnicode_GET_LENGTH(a[PATH]);
        /* Every name in parser._METHODS is a token, so the token test alone
         * decides "method not in _METHODS and not a token". */
        ok = is_token(PyUnicode_1BYTE_DATA(a[METHOD]), PyUnicode_GET_LENGTH(a[METHOD])) && path_len > 0 &&
             !memchr(path, ' ', (size_t)path_len) && !memchr(path, '\t', (size_t)path_len);
    }
    ok = ok && measure_text(a[METHOD], &total) && measure_text(a[PATH], &total) &&
         measure_text(a[AUTHORITY], &total);
    if (ok) {
        int fields = measure_fields(a[HEADERS], &total);
        if (fields < 0) goto done;
        ok = fields;
    }
    /* " " " HTTP/1.1\r\n" "host: " "\r\n" ... "\r\n" */
    ok = ok && add_size(&total, 1 + 11 + 6 + 2 + 2);
    if (!ok) {
        result = fall_back(py_request_fallback, head);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) goto done;
    Writer w = {PyBytes_AS_STRING(result), PyBytes_AS_STRING(result) + total};
    Py_ssize_t count = PyList_GET_SIZE(a[HEADERS]);
    ok = put_str(&w, a[METHOD]) && put(&w, " ", 1) && put_str(&w, a[PATH]) && put(&w, " HTTP/1.1\r\n", 11) &&
         put(&w, "host: ", 6) && put_str(&w, a[AUTHORITY]) && put(&w, "\r\n", 2) &&
         put_fields(&w, a[HEADERS], count) && put(&w, "\r\n", 2) && w.p == w.end;
    if (!ok) {
        /* Unreachable unless the head changed between measuring and copying. */
        Py_CLEAR(result);
        result = fall_back(py_request_fallback, head);
    }
done:
    drop_attrs(a, N);
    return result;
}

/* "HTTP/1.1 status reason\r\n" + fields + "\r\n". */
static PyObject *
serialize_response_head(PyObject *module, PyObject *head)
{
    enum { STATUS, REASON, HEADERS, N };
    PyObject *names[N] = {str_status, str_reason, str_headers};
    PyObject *a[N];
    PyObject *result = NULL;
    PyObject *reason = NULL;
    if (!get_attrs(head, names, a, N)) return NULL;

    long status = -1;
    if (PyLong_CheckExact(a[STATUS])) {
        int overflow;
        status = PyLong_AsLongAndOverflow(a[STATUS], &overflow);
        if (status == -1 && PyErr_Occurred()) goto done;
    }
    /* reason = head.reason or _REASONS.get(status, ""): only an exact str
     * (truthy when non-empty) or None is handled here. */
    PyObject *given = a[REASON];
    if (given == Py_None || (PyUnicode_CheckExact(given) && PyUnicode_GET_LENGTH(given) == 0)) {
        if (status >= 100 && status <= 999) {
            reason = PyDict_GetItemWithError(reasons, a[STATUS]);
            if (reason == NULL && PyErr_Occurred()) goto done;
        }
    } else {
        reason = given;
    }
    Py_XINCREF(reason); /* held: borrowed from the dict or the head */
    Py_ssize_t total = 0;
    int ok = status >= 100 && status <= 999 && is_plain_list(a[HEADERS]);
    if (ok && reason != NULL) ok = measure_text(reason, &total);
    if (ok) {
        int fields = measure_fields(a[HEADERS], &total);
        if (fields < 0) goto done;
        ok = fields;
    }
    /* "HTTP/1.1 " "NNN" " " "\r\n" ... "\r\n" */
    ok = ok && add_size(&total, 9 + 3 + 1 + 2 + 2);
    if (!ok) {
        result = fall_back(py_response_fallback, head);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) goto done;
    Writer w = {PyBytes_AS_STRING(result), PyBytes_AS_STRING(result) + total};
    char code[3] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10), (char)('0' + status % 10)};
    Py_ssize_t count = PyList_GET_SIZE(a[HEADERS]);
    ok = put(&w, "HTTP/1.1 ", 9) && put(&w, code, 3) && put(&w, " ", 1) && (reason == NULL || put_str(&w, reason)) &&
         put(&w, "\r\n", 2) && put_fields(&w, a[HEADERS], count) && put(&w, "\r\n", 2) && w.p == w.end;
    if (!ok) {
        Py_CLEAR(result);
        result = fall_back(py_response_fallback, head);
    }
done:
    Py_XDECREF(reason);
    drop_attrs(a, N);
    return result;
}

/* Appends item to *list, creating the list on first use; 0 on error. */
static int
append_lazily(PyObject **list, PyObject *item)
{
    if (*list == NULL && (*list = PyList_New(0)) == NULL) return 0;
    return PyList_Append(*list, item) == 0;
}

/*
 * lines[first:] -> (headers, specials, hop), as parser._py_read_fields:
 * specials lists the fields named in `special` (None if none); a field named
 * `keep_out` among them is left out of the headers (the request's Host);
 * with `hop_by_hop` a set, the fields it names go to hop (None if none)
 * instead of the headers. A line found in _FIELD_CACHE was checked when it
 * was stored and has no special name: like the Python loop, only the other
 * lines are sorted.
 */
static PyObject *
read_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "read_fields(lines, first, special, keep_out, hop_by_hop, status)");
        return NULL;
    }
    PyObject *lines = args[0], *special = args[2], *keep_out = args[3], *hop_by_hop = args[4], *status = args[5];
    if (!PyList_Check(lines) || !PyAnySet_Check(special) || (hop_by_hop != Py_None && !PyAnySet_Check(hop_by_hop))) {
        PyErr_SetString(PyExc_TypeError, "read_fields: lines must be a list, special and hop_by_hop sets");
        return NULL;
    }
    Py_ssize_t first = PyLong_AsSsize_t(args[1]);
    if (first == -1 && PyErr_Occurred()) return NULL;
    if (first < 0) {
        PyErr_SetString(PyExc_ValueError, "read_fields: first must not be negative");
        return NULL;
    }
    if (headers_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() was not called");
        return NULL;
    }
    PyObject *headers = PyObject_CallNoArgs(headers_type);
    PyObject *specials = NULL, *hop = NULL, *field = NULL;
    if (headers == NULL) goto error;
    if (!PyList_Check(headers)) { /* a __new__ could return anything */
        PyErr_SetString(PyExc_TypeError, "read_fields: headers_type() did not make a list");
        goto error;
    }
    /* The size is read on every turn: _new_field is Python code. */
    for (Py_ssize_t i = first; i < PyList_GET_SIZE(lines); i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        /* The line is held: a str subclass's __eq__ could run Python code
         * during a lookup, as _new_field does (which may empty the caches:
         * a field found is held too before anything else runs). */
        Py_INCREF(line);
        PyObject *hit = PyDict_GetItemWithError(field_cache, line);
        if (hit != NULL) {
            Py_DECREF(line);
            if (PyList_Append(headers, hit) < 0) goto error;
            continue;
        }
        if (PyErr_Occurred()) {
            Py_DECREF(line);
            goto error;
        }
        field = PyDict_GetItemWithError(special_cache, line);
        if (field != NULL) {
            Py_INCREF(field);
        } else if (!PyErr_Occurred()) {
            field = PyObject_CallFunctionObjArgs(new_field, line, status, NULL);
        }
        Py_DECREF(line);
        if (field == NULL) goto error;
        if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 2) {
            PyErr_SetString(PyExc_TypeError, "read_fields: a field is not a (name, value) tuple");
            goto error;
        }
        PyObject *name = PyTuple_GET_ITEM(field, 0);
        int is_special = PySet_Contains(special, name);
        if (is_special < 0) goto error;
        if (is_special) {
            if (!append_lazily(&specials, field)) goto error;
            int left_out = keep_out != Py_None ? PyObject_RichCompareBool(name, keep_out, Py_EQ) : 0;
            if (left_out < 0) goto error;
            if (left_out) {
                Py_CLEAR(field);
                continue;
            }
        }
        if (hop_by_hop != Py_None) {
            int is_hop = PySet_Contains(hop_by_hop, name);
            if (is_hop < 0) goto error;
            if (is_hop) {
                if (!append_lazily(&hop, field)) goto error;
                Py_CLEAR(field);
                continue;
            }
        }
        if (PyList_Append(headers, field) < 0) goto error;
        Py_CLEAR(field);
    }
    PyObject *result = PyTuple_Pack(3, headers, specials ? specials : Py_None, hop ? hop : Py_None);
    Py_DECREF(headers);
    Py_XDECREF(specials);
    Py_XDECREF(hop);
    return result;
error:
    Py_XDECREF(field);
    Py_XDECREF(headers);
    Py_XDECREF(specials);
    Py_XDECREF(hop);
    return NULL;
}

/* The start of the first CRLF in p[0:n], or NULL: what str.split("\r\n")
 * cuts at, scanning left to right. */
static const char *
find_crlf(const char *p, Py_ssize_t n)
{
    const char *end = p + n;
    while (p < end) {
        const char *cr = memchr(p, '\r', (size_t)(end - p));
        if (cr == NULL || cr + 1 >= end) return NULL;
        if (cr[1] == '\n') return cr;
        p = cr + 1;
    }
    return NULL;
}

/* How many lines str.split("\r\n") makes of p[0:n]. */
static Py_ssize_t
count_lines(const char *p, Py_ssize_t n)
{
    const char *stop = p + n;
    Py_ssize_t count = 1;
    for (const char *crlf; (crlf = find_crlf(p, stop - p)) != NULL; p = crlf + 2) count++;
    return count;
}

/* Puts the latin-1 text p[0:n] in lines[i] as a str; 0 on error. */
static int
set_line(PyObject *lines, Py_ssize_t i, const char *p, Py_ssize_t n)
{
    PyObject *line = PyUnicode_DecodeLatin1(p, n, NULL);
    if (line == NULL) return 0;
    PyList_SET_ITEM(lines, i, line);
    return 1;
}

/*
 * split_head(buf, start, end) -> list of str, as parser._py_split_head:
 * buf[start:end].decode("latin-1").split("\r\n") without the two copies.
 * buf is the parser's bytes or bytearray; 0 <= start <= end <= len(buf) is
 * required (the parser's own indices; anything else is a ValueError). No
 * Python code runs while the buffer is held, so it cannot be resized.
 */
static PyObject *
split_head(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "split_head(buf, start, end)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred()) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *lines = NULL;
    if (start < 0 || start > end || end > view.len) {
        PyErr_SetString(PyExc_ValueError, "split_head: indices out of range");
        goto done;
    }
    const char *p = (const char *)view.buf + start;
    const char *stop = (const char *)view.buf + end;
    /* Counted first: a list made at its size is filled without regrowing
     * (a list's unset items are NULL, which freeing it on error skips). */
    Py_ssize_t count = count_lines(p, stop - p);
    lines = PyList_New(count);
    if (lines == NULL) goto done;
    Py_ssize_t i = 0;
    for (const char *crlf; i < count - 1 && (crlf = find_crlf(p, stop - p)) != NULL; p = crlf + 2) {
        if (!set_line(lines, i++, p, crlf - p)) goto fail;
    }
    if (i != count - 1) { /* unreachable: the held buffer cannot change */
        PyErr_SetString(PyExc_RuntimeError, "split_head: the buffer changed");
        goto fail;
    }
    if (set_line(lines, i, p, stop - p)) goto done;
fail:
    Py_CLEAR(lines);
done:
    PyBuffer_Release(&view);
    return lines;
}

/* The version of a request line if it is "HTTP/1.1" or "HTTP/1.0" (a new
 * reference to the interned constant), else NULL without an error. */
static PyObject *
known_version(const unsigned char *p, Py_ssize_t n)
{
    if (n != 8 || memcmp(p, "HTTP/1.", 7) != 0) return NULL;
    if (p[7] == '1') return Py_NewRef(str_http11);
    if (p[7] == '0') return Py_NewRef(str_http10);
    return NULL;
}

/* Nonzero if p[0:n] is a request-target that _py_request_line accepts:
 * not empty, printable ASCII without space, no '#'. */
static int
is_plain_target(const unsigned char *p, Py_ssize_t n)
{
    if (n == 0) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p[i] < 0x21 || p[i] > 0x7e || p[i] == '#') return 0;
    }
    return 1;
}

/*
 * request_line(line) -> (method, target, version), as
 * parser._py_request_line, which gets every line this does not accept (so
 * every error is Python's). Accepted: an exact str "METHOD SP target SP
 * HTTP/1.x" with exactly two spaces, a token method and a target that is
 * printable ASCII without '#'. The version is returned as the interned
 * constant (equal to what split would give).
 */
static PyObject *
request_line(PyObject *module, PyObject *line)
{
    if (py_request_line == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_speedups.configure() was not called");
        return NULL;
    }
    if (!is_latin1_str(line)) return PyObject_CallOneArg(py_request_line, line);
    const unsigned char *p = PyUnicode_1BYTE_DATA(line);
    Py_ssize_t n = PyUnicode_GET_LENGTH(line);
    const unsigned char *sp1 = memchr(p, ' ', (size_t)n);
    const unsigned char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(n - (sp1 + 1 - p))) : NULL;
    if (sp2 == NULL || memchr(sp2 + 1, ' ', (size_t)(n - (sp2 + 1 - p))) != NULL)
        return PyObject_CallOneArg(py_request_line, line);
    Py_ssize_t method_len = sp1 - p, target_len = sp2 - (sp1 + 1);
    PyObject *version = known_version(sp2 + 1, n - (sp2 + 1 - p));
    if (version == NULL || !is_token(p, method_len) || !is_plain_target(sp1 + 1, target_len)) {
        Py_XDECREF(version);
        return PyObject_CallOneArg(py_request_line, line);
    }
    PyObject *method = PyUnicode_Substring(line, 0, method_len);
    PyObject *target = method ? PyUnicode_Substring(line, method_len + 1, method_len + 1 + target_len) : NULL;
    PyObject *result = target ? PyTuple_Pack(3, method, target, version) : NULL;
    Py_XDECREF(method);
    Py_XDECREF(target);
    Py_DECREF(version);
    return result;
}

/* configure(*, request_fallback, response_fallback, out_names, reasons,
 *           name_cache_max, field_cache, special_cache, new_field, headers_type,
 *           request_line_fallback):
 * parser.py shares its caches and names its Python functions. */
static PyObject *
configure(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"request_fallback", "response_fallback", "out_names", "reasons", "name_cache_max",
                               "field_cache", "special_cache", "new_field", "headers_type", "request_line_fallback",
                               NULL};
    PyObject *request, *response, *names, *phrases, *fields, *specials, *parse_field, *type, *parse_request_line;
    Py_ssize_t cache_max;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOO!O!nO!O!OO!O:configure", keywords, &request, &response,
                                     &PySet_Type, &names, &PyDict_Type, &phrases, &cache_max, &PyDict_Type, &fields,
                                     &PyDict_Type, &specials, &parse_field, &PyType_Type, &type,
                                     &parse_request_line))
        return NULL;
    if (!PyCallable_Check(request) || !PyCallable_Check(response) || !PyCallable_Check(parse_field) ||
        !PyCallable_Check(parse_request_line)) {
        PyErr_SetString(PyExc_TypeError, "configure: fallbacks and new_field must be callable");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)type, &PyList_Type)) {
        PyErr_SetString(PyExc_TypeError, "configure: headers_type must be a list subclass");
        return NULL;
    }
    Py_XSETREF(py_request_fallback, Py_NewRef(request));
    Py_XSETREF(py_response_fallback, Py_NewRef(response));
    Py_XSETREF(out_names, Py_NewRef(names));
    Py_XSETREF(reasons, Py_NewRef(phrases));
    Py_XSETREF(field_cache, Py_NewRef(fields));
    Py_XSETREF(special_cache, Py_NewRef(specials));
    Py_XSETREF(new_field, Py_NewRef(parse_field));
    Py_XSETREF(headers_type, Py_NewRef(type));
    Py_XSETREF(py_request_line, Py_NewRef(parse_request_line));
    name_cache_max = cache_max;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, request_fallback, response_fallback, out_names, reasons, name_cache_max, field_cache, "
     "special_cache, new_field, headers_type, request_line_fallback): parser.py's caches and Python functions."},
    {"read_fields", (PyCFunction)(void (*)(void))read_fields, METH_FASTCALL,
     "read_fields(lines, first, special, keep_out, hop_by_hop, status) -> (headers, specials, hop); "
     "as parser._py_read_fields."},
    {"split_head", (PyCFunction)(void (*)(void))split_head, METH_FASTCALL,
     "split_head(buf, start, end) -> list of str; as parser._py_split_head."},
    {"request_line", request_line, METH_O,
     "request_line(line) -> (method, target, version); as parser._py_request_line."},
    {"serialize_request_head", serialize_request_head, METH_O,
     "serialize_request_head(head) -> bytes; same as parser.py's."},
    {"serialize_response_head", serialize_response_head, METH_O,
     "serialize_response_head(head) -> bytes; same as parser.py's."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_speedups", "C versions of the http1 codec's hot paths (see parser.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_tchar();
    if (!(str_method = PyUnicode_InternFromString("method")) || !(str_path = PyUnicode_InternFromString("path")) ||
        !(str_authority = PyUnicode_InternFromString("authority")) ||
        !(str_headers = PyUnicode_InternFromString("headers")) ||
        !(str_status = PyUnicode_InternFromString("status")) || !(str_reason = PyUnicode_InternFromString("reason")) ||
        !(str_http11 = PyUnicode_InternFromString("HTTP/1.1")) || !(str_http10 = PyUnicode_InternFromString("HTTP/1.0")))
        return NULL;
    return PyModule_Create(&module_def);
}
