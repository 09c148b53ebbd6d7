/* schema: compiling JSON Schema into a tree of checks, and running it. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "schema.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pcre2.h>

/* Type bits, in the order they are named in messages. */
enum {
    T_NULL = 1 << 0,
    T_BOOLEAN = 1 << 1,
    T_OBJECT = 1 << 2,
    T_ARRAY = 1 << 3,
    T_NUMBER = 1 << 4,
    T_STRING = 1 << 5,
    T_INTEGER = 1 << 6,
};

static const char *const type_names[] = {
    "null", "boolean", "object", "array", "number", "string", "integer",
};

/* Which optional number checks a node has. */
enum {
    N_MIN = 1 << 0,
    N_MAX = 1 << 1,
    N_XMIN = 1 << 2,
    N_XMAX = 1 << 3,
    N_MULT = 1 << 4,
};

typedef struct node node;

typedef struct {
    node **v;
    size_t n;
} node_list;

struct node {
    const cJSON *src; /* where in the schema copy it came from */
    int boolean;      /* -1: an object schema; else the boolean's value */

    unsigned types; /* 0: any */
    unsigned num_flags;
    double minimum, maximum, xminimum, xmaximum, multiple_of;
    double min_length, max_length; /* -1: none */
    double min_items, max_items;
    double min_props, max_props;
    bool unique_items;
    pcre2_code *pattern;
    const char *pattern_text;
    const cJSON *enum_values; /* an array, or NULL */
    const cJSON *const_value; /* or NULL */

    size_t nprops; /* sorted by name */
    const char **prop_names;
    node **prop_nodes;
    const cJSON *required; /* an array of strings, or NULL */
    node *additional;

    node_list prefix;
    node *items;

    node_list all_of, any_of, one_of;
    node *not_;

    const char *ref; /* the $ref text, or NULL */
    char *ref_path;  /* where the $ref is, for messages */
    node *ref_node;
};

struct schema {
    cJSON *doc;   /* our copy */
    node **nodes; /* every node, for lookup by src and for freeing */
    size_t n, cap;
    pcre2_match_context *mctx;
    node *root;
};

/* ---- compiling ---- */

typedef struct {
    schema_t *s;
    char *err;
    size_t err_size;
    char path[512]; /* e.g. properties.x.items */
    size_t plen;
    int depth;
} compiler;

static bool cfail(compiler *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static bool cfail(compiler *c, const char *fmt, ...) {
    if (c->err == NULL || c->err_size == 0) return false;

    char what[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(c->err, c->err_size, "%s at %s", what,
             c->plen ? c->path : "the schema root");
    return false;
}

/* Appends ".name" (or "name" at the start) to the path; returns the old
 * length to restore. */
static size_t path_push(compiler *c, const char *name) {
    size_t old = c->plen;
    int n = snprintf(c->path + c->plen, sizeof c->path - c->plen, "%s%s",
                     c->plen ? "." : "", name);

    if (n > 0) c->plen += (size_t)n;
    if (c->plen >= sizeof c->path) c->plen = sizeof c->path - 1;
    return old;
}

static size_t path_push_index(compiler *c, size_t i) {
    size_t old = c->plen;
    int n = snprintf(c->path + c->plen, sizeof c->path - c->plen, "[%zu]", i);

    if (n > 0) c->plen += (size_t)n;
    if (c->plen >= sizeof c->path) c->plen = sizeof c->path - 1;
    return old;
}

static void path_pop(compiler *c, size_t old) {
    c->plen = old;
    c->path[old] = '\0';
}

static node *new_node(compiler *c, const cJSON *src) {
    schema_t *s = c->s;

    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 16;
        node **v = realloc(s->nodes, cap * sizeof *v);
        if (v == NULL) return NULL;
        s->nodes = v;
        s->cap = cap;
    }

    node *nd = calloc(1, sizeof *nd);
    if (nd == NULL) return NULL;
    nd->src = src;
    nd->boolean = -1;
    nd->min_length = nd->max_length = -1;
    nd->min_items = nd->max_items = -1;
    nd->min_props = nd->max_props = -1;
    s->nodes[s->n++] = nd;
    return nd;
}

static node *compile_node(compiler *c, const cJSON *src);

/* Compiles a keyword's value as a subschema, path extended by `key`. */
static bool compile_sub(compiler *c, const char *key, const cJSON *v,
                        node **out) {
    size_t old = path_push(c, key);

    *out = compile_node(c, v);
    if (*out != NULL) path_pop(c, old);
    return *out != NULL;
}

/* A non-empty array of schemas (allOf, anyOf, oneOf, prefixItems). */
static bool compile_list(compiler *c, const char *key, const cJSON *v,
                         node_list *out) {
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) == 0)
        return cfail(c, "%s must be a non-empty array of schemas", key);

    size_t n = (size_t)cJSON_GetArraySize(v), i = 0;
    out->v = calloc(n, sizeof *out->v);
    if (out->v == NULL) return cfail(c, "out of memory compiling %s", key);
    out->n = n;

    size_t old = path_push(c, key);
    for (const cJSON *e = v->child; e != NULL; e = e->next, i++) {
        size_t mid = path_push_index(c, i);
        out->v[i] = compile_node(c, e);
        if (out->v[i] == NULL) return false;
        path_pop(c, mid);
    }
    path_pop(c, old);
    return true;
}

/* A number keyword. */
static bool get_number(compiler *c, const char *key, const cJSON *v,
                       double *out) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return cfail(c, "%s must be a number", key);
    *out = v->valuedouble;
    return true;
}

/* A count keyword (minLength, maxItems, ...): a non-negative integer. */
static bool get_count(compiler *c, const char *key, const cJSON *v,
                      double *out) {
    double d = v->valuedouble;

    if (!cJSON_IsNumber(v) || !isfinite(d) || d < 0 || floor(d) != d)
        return cfail(c, "%s must be a non-negative integer", key);
    *out = d;
    return true;
}

static int type_bit(const char *name) {
    for (size_t i = 0; i < sizeof type_names / sizeof *type_names; i++)
        if (strcmp(name, type_names[i]) == 0) return 1 << i;
    return 0;
}

static bool compile_type(compiler *c, node *nd, const cJSON *v) {
    if (cJSON_IsString(v)) {
        nd->types = (unsigned)type_bit(v->valuestring);
        if (nd->types == 0)
            return cfail(c, "unknown type \"%.40s\"", v->valuestring);
        return true;
    }
    if (!cJSON_IsArray(v) || v->child == NULL)
        return cfail(c, "type must be a type name or a non-empty array of "
                        "them");
    for (const cJSON *e = v->child; e != NULL; e = e->next) {
        int bit = cJSON_IsString(e) ? type_bit(e->valuestring) : 0;
        if (bit == 0)
            return cfail(c, "type must list names among null, boolean, "
                            "object, array, number, string, integer");
        if (nd->types & (unsigned)bit)
            return cfail(c, "type lists \"%s\" twice", e->valuestring);
        nd->types |= (unsigned)bit;
    }
    return true;
}

static int cmp_member(const void *a, const void *b) {
    const cJSON *x = *(const cJSON *const *)a;
    const cJSON *y = *(const cJSON *const *)b;

    return strcmp(x->string, y->string);
}

static bool compile_properties(compiler *c, node *nd, const cJSON *v) {
    if (!cJSON_IsObject(v))
        return cfail(c, "properties must be an object of schemas");

    size_t n = (size_t)cJSON_GetArraySize(v), i = 0;
    if (n == 0) return true;

    /* Sort member pointers by name, then compile in that order. */
    const cJSON **members = calloc(n, sizeof *members);
    nd->prop_names = calloc(n, sizeof *nd->prop_names);
    nd->prop_nodes = calloc(n, sizeof *nd->prop_nodes);
    if (members == NULL || nd->prop_names == NULL || nd->prop_nodes == NULL) {
        free(members);
        return cfail(c, "out of memory compiling properties");
    }
    for (const cJSON *m = v->child; m != NULL; m = m->next)
        members[i++] = m;
    qsort(members, n, sizeof *members, cmp_member);
    nd->nprops = n;

    bool ok = true;
    size_t old = path_push(c, "properties");
    for (i = 0; i < n && ok; i++) {
        if (i > 0 && strcmp(members[i - 1]->string, members[i]->string) == 0)
            ok = cfail(c, "property \"%.40s\" appears twice",
                       members[i]->string);
        nd->prop_names[i] = members[i]->string;
        if (ok)
            ok = compile_sub(c, members[i]->string, members[i],
                             &nd->prop_nodes[i]);
    }
    if (ok) path_pop(c, old);
    free(members);
    return ok;
}

static bool compile_required(compiler *c, node *nd, const cJSON *v) {
    if (!cJSON_IsArray(v))
        return cfail(c, "required must be an array of strings");
    for (const cJSON *e = v->child; e != NULL; e = e->next)
        if (!cJSON_IsString(e))
            return cfail(c, "required must be an array of strings");
    nd->required = v;
    return true;
}

/* ECMA-262 long General_Category names that PCRE2 10.42 lacks. */
static const char *const gc_names[][2] = {
    {"Letter", "L"},
    {"Cased_Letter", "L&"},
    {"Uppercase_Letter", "Lu"},
    {"Lowercase_Letter", "Ll"},
    {"Titlecase_Letter", "Lt"},
    {"Modifier_Letter", "Lm"},
    {"Other_Letter", "Lo"},
    {"Mark", "M"},
    {"Combining_Mark", "M"},
    {"Nonspacing_Mark", "Mn"},
    {"Spacing_Mark", "Mc"},
    {"Enclosing_Mark", "Me"},
    {"Number", "N"},
    {"Decimal_Number", "Nd"},
    {"digit", "Nd"},
    {"Letter_Number", "Nl"},
    {"Other_Number", "No"},
    {"Punctuation", "P"},
    {"punct", "P"},
    {"Connector_Punctuation", "Pc"},
    {"Dash_Punctuation", "Pd"},
    {"Open_Punctuation", "Ps"},
    {"Close_Punctuation", "Pe"},
    {"Initial_Punctuation", "Pi"},
    {"Final_Punctuation", "Pf"},
    {"Other_Punctuation", "Po"},
    {"Symbol", "S"},
    {"Math_Symbol", "Sm"},
    {"Currency_Symbol", "Sc"},
    {"Modifier_Symbol", "Sk"},
    {"Other_Symbol", "So"},
    {"Separator", "Z"},
    {"Space_Separator", "Zs"},
    {"Line_Separator", "Zl"},
    {"Paragraph_Separator", "Zp"},
    {"Other", "C"},
    {"Control", "Cc"},
    {"cntrl", "Cc"},
    {"Format", "Cf"},
    {"Surrogate", "Cs"},
    {"Private_Use", "Co"},
    {"Unassigned", "Cn"},
};

/* Copies pattern into a new string with \p{Long_Name} and \P{...}
 * rewritten to PCRE2's short names (also "General_Category=" and "gc="
 * prefixes). Other escapes are copied as they are. NULL on no memory. */
static char *translate_pattern(const char *p) {
    size_t n = strlen(p);
    char *out = malloc(n + 1); /* short names are never longer */
    size_t w = 0;

    if (out == NULL) return NULL;
    for (size_t i = 0; i < n; i++) {
        out[w++] = p[i];
        if (p[i] != '\\' || i + 1 >= n) continue;
        out[w++] = p[++i];
        if ((p[i] != 'p' && p[i] != 'P') || p[i + 1] != '{') continue;

        const char *name = p + i + 2, *end = strchr(name, '}');
        if (end == NULL) continue;
        if (strncmp(name, "General_Category=", 17) == 0)
            name += 17;
        else if (strncmp(name, "gc=", 3) == 0)
            name += 3;
        size_t len = (size_t)(end - name);
        for (size_t g = 0; g < sizeof gc_names / sizeof *gc_names; g++) {
            if (strlen(gc_names[g][0]) == len &&
                strncmp(name, gc_names[g][0], len) == 0) {
                w += (size_t)sprintf(out + w, "{%s}", gc_names[g][1]);
                i = (size_t)(end - p);
                break;
            }
        }
    }
    out[w] = '\0';
    return out;
}

static bool compile_pattern(compiler *c, node *nd, const cJSON *v) {
    int code = 0;
    PCRE2_SIZE at = 0;

    if (!cJSON_IsString(v)) return cfail(c, "pattern must be a string");

    /* Closer to ECMA-262: '$' only at the very end, '.' stops at CR and
     * LF. */
    char *text = translate_pattern(v->valuestring);
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (text != NULL && cc != NULL) {
        pcre2_set_newline(cc, PCRE2_NEWLINE_ANYCRLF);
        nd->pattern =
            pcre2_compile((PCRE2_SPTR)text, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_DOLLAR_ENDONLY, &code, &at, cc);
    }
    pcre2_compile_context_free(cc);
    free(text);
    if (code == 0 && nd->pattern == NULL)
        return cfail(c, "out of memory compiling a pattern");
    if (nd->pattern == NULL) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(code, msg, sizeof msg);
        size_t old = path_push(c, "pattern");
        cfail(c, "bad pattern \"%.60s\" (%s at offset %zu)", v->valuestring,
              (const char *)msg, (size_t)at);
        path_pop(c, old);
        return false;
    }
    nd->pattern_text = v->valuestring;
    return true;
}

/* $defs and definitions: every member is a schema, compiled now so that
 * one that uses an unsupported keyword is refused even if unused. */
static bool compile_defs(compiler *c, const char *key, const cJSON *v) {
    if (!cJSON_IsObject(v))
        return cfail(c, "%s must be an object of schemas", key);

    size_t old = path_push(c, key);
    for (const cJSON *m = v->child; m != NULL; m = m->next) {
        node *unused;
        if (!compile_sub(c, m->string, m, &unused)) return false;
    }
    path_pop(c, old);
    return true;
}

static const char *const annotations[] = {
    "title",      "description",      "default",         "examples",
    "deprecated", "readOnly",         "writeOnly",       "$comment",
    "format",     "contentMediaType", "contentEncoding",
};

/* $schema values taken to mean "the usual vocabularies". Another URI may
 * name a metaschema that turns keywords off or on, so it is refused. */
static const char *const metaschemas[] = {
    "https://json-schema.org/draft/2020-12/schema",
    "https://json-schema.org/draft/2019-09/schema",
    "http://json-schema.org/draft-07/schema",
};

static bool known_metaschema(const char *uri) {
    size_t n = strlen(uri);

    if (n > 0 && uri[n - 1] == '#') n--;
    for (size_t i = 0; i < sizeof metaschemas / sizeof *metaschemas; i++)
        if (strlen(metaschemas[i]) == n && strncmp(uri, metaschemas[i], n) == 0)
            return true;
    return false;
}

static bool is_annotation(const char *key) {
    for (size_t i = 0; i < sizeof annotations / sizeof *annotations; i++)
        if (strcmp(key, annotations[i]) == 0) return true;
    return false;
}

/* One keyword of an object schema. */
static bool compile_keyword(compiler *c, node *nd, const cJSON *kw) {
    const char *k = kw->string;

#define IS(name) (strcmp(k, name) == 0)
    if (is_annotation(k)) return true;
    if (IS("$schema")) {
        if (!cJSON_IsString(kw)) return cfail(c, "$schema must be a string");
        if (!known_metaschema(kw->valuestring))
            return cfail(c,
                         "unsupported $schema \"%.80s\" (only the "
                         "draft 2020-12, 2019-09 and draft-07 "
                         "metaschemas)",
                         kw->valuestring);
        return true;
    }
    if (IS("$id")) {
        if (nd->src != c->s->doc)
            return cfail(c, "unsupported keyword \"$id\" below the root "
                            "(only a root $id is accepted)");
        return cJSON_IsString(kw) ? true : cfail(c, "$id must be a string");
    }
    if (IS("type")) return compile_type(c, nd, kw);
    if (IS("properties")) return compile_properties(c, nd, kw);
    if (IS("required")) return compile_required(c, nd, kw);
    if (IS("additionalProperties"))
        return compile_sub(c, k, kw, &nd->additional);
    if (IS("items")) {
        if (cJSON_IsArray(kw))
            return cfail(c, "items must be a schema (an array of schemas "
                            "is prefixItems in draft 2020-12)");
        return compile_sub(c, k, kw, &nd->items);
    }
    if (IS("prefixItems")) return compile_list(c, k, kw, &nd->prefix);
    if (IS("enum")) {
        if (!cJSON_IsArray(kw)) return cfail(c, "enum must be an array");
        nd->enum_values = kw;
        return true;
    }
    if (IS("const")) {
        nd->const_value = kw;
        return true;
    }
    if (IS("minimum"))
        return (nd->num_flags |= N_MIN, get_number(c, k, kw, &nd->minimum));
    if (IS("maximum"))
        return (nd->num_flags |= N_MAX, get_number(c, k, kw, &nd->maximum));
    if (IS("exclusiveMinimum"))
        return (nd->num_flags |= N_XMIN, get_number(c, k, kw, &nd->xminimum));
    if (IS("exclusiveMaximum"))
        return (nd->num_flags |= N_XMAX, get_number(c, k, kw, &nd->xmaximum));
    if (IS("multipleOf")) {
        nd->num_flags |= N_MULT;
        if (!get_number(c, k, kw, &nd->multiple_of)) return false;
        return nd->multiple_of > 0 ? true
                                   : cfail(c, "multipleOf must be above 0");
    }
    if (IS("minLength")) return get_count(c, k, kw, &nd->min_length);
    if (IS("maxLength")) return get_count(c, k, kw, &nd->max_length);
    if (IS("minItems")) return get_count(c, k, kw, &nd->min_items);
    if (IS("maxItems")) return get_count(c, k, kw, &nd->max_items);
    if (IS("minProperties")) return get_count(c, k, kw, &nd->min_props);
    if (IS("maxProperties")) return get_count(c, k, kw, &nd->max_props);
    if (IS("pattern")) return compile_pattern(c, nd, kw);
    if (IS("uniqueItems")) {
        if (!cJSON_IsBool(kw)) return cfail(c, "uniqueItems must be a boolean");
        nd->unique_items = cJSON_IsTrue(kw);
        return true;
    }
    if (IS("allOf")) return compile_list(c, k, kw, &nd->all_of);
    if (IS("anyOf")) return compile_list(c, k, kw, &nd->any_of);
    if (IS("oneOf")) return compile_list(c, k, kw, &nd->one_of);
    if (IS("not")) return compile_sub(c, k, kw, &nd->not_);
    if (IS("$defs") || IS("definitions")) return compile_defs(c, k, kw);
    if (IS("$ref")) {
        if (!cJSON_IsString(kw)) return cfail(c, "$ref must be a string");
        nd->ref = kw->valuestring;
        size_t old = path_push(c, "$ref");
        nd->ref_path = strdup(c->path);
        path_pop(c, old);
        return nd->ref_path != NULL ? true : cfail(c, "out of memory at $ref");
    }
#undef IS
    return cfail(c, "unsupported keyword \"%.60s\"", k);
}

/* Compiles the schema at src (an object or a boolean). Returns NULL with
 * the error set. */
static node *compile_node(compiler *c, const cJSON *src) {
    if (!cJSON_IsObject(src) && !cJSON_IsBool(src)) {
        cfail(c, "a schema must be an object or a boolean");
        return NULL;
    }
    if (c->depth >= SCHEMA_MAX_NESTING) {
        cfail(c, "schema nested deeper than %d levels", SCHEMA_MAX_NESTING);
        return NULL;
    }

    node *nd = new_node(c, src);
    if (nd == NULL) {
        cfail(c, "out of memory compiling the schema");
        return NULL;
    }
    if (cJSON_IsBool(src)) {
        nd->boolean = cJSON_IsTrue(src);
        return nd;
    }

    bool ok = true;
    c->depth++;
    for (const cJSON *kw = src->child; kw != NULL && ok; kw = kw->next)
        ok = compile_keyword(c, nd, kw);
    c->depth--;
    return ok ? nd : NULL;
}

/* ---- $ref ---- */

static int hex_digit(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'f') return (ch | 0x20) - 'a' + 10;
    return -1;
}

/* Decodes %XX escapes in place. False on a bad escape or a NUL. */
static bool percent_decode(char *s) {
    char *w = s;

    for (const char *r = s; *r != '\0'; r++) {
        if (*r != '%') {
            *w++ = *r;
            continue;
        }
        int hi = hex_digit(r[1]), lo = hi < 0 ? -1 : hex_digit(r[2]);
        if (lo < 0 || (hi == 0 && lo == 0)) return false;
        *w++ = (char)(hi * 16 + lo);
        r += 2;
    }
    *w = '\0';
    return true;
}

/* Decodes ~1 and ~0 in one pointer token, in place. */
static bool pointer_unescape(char *tok) {
    char *w = tok;

    for (const char *r = tok; *r != '\0'; r++) {
        if (*r != '~') {
            *w++ = *r;
        } else if (r[1] == '0' || r[1] == '1') {
            *w++ = r[1] == '0' ? '~' : '/';
            r++;
        } else {
            return false;
        }
    }
    *w = '\0';
    return true;
}

static const cJSON *pointer_step(const cJSON *at, const char *tok) {
    if (cJSON_IsObject(at)) return cJSON_GetObjectItemCaseSensitive(at, tok);
    if (!cJSON_IsArray(at) || tok[0] == '\0' ||
        (tok[0] == '0' && tok[1] != '\0'))
        return NULL;

    long i = 0;
    for (const char *p = tok; *p != '\0'; p++) {
        if (*p < '0' || *p > '9' || i > 100000000L) return NULL;
        i = i * 10 + (*p - '0');
    }
    return cJSON_GetArrayItem(at, (int)i);
}

/* Where "#/a/b" points in the document; NULL with the error set. */
static const cJSON *resolve_pointer(compiler *c, const char *ref) {
    if (ref[0] != '#') {
        cfail(c,
              "unsupported $ref \"%.80s\": only local references "
              "starting with '#' are supported",
              ref);
        return NULL;
    }
    if (ref[1] != '\0' && ref[1] != '/') {
        cfail(c, "unsupported $ref \"%.80s\": anchors are not supported", ref);
        return NULL;
    }

    char *copy = strdup(ref + 1);
    if (copy == NULL || !percent_decode(copy)) {
        free(copy);
        cfail(c, "$ref \"%.80s\" is not a valid JSON pointer", ref);
        return NULL;
    }

    const cJSON *at = c->s->doc;
    bool ok = true;
    /* strtok_r would merge empty tokens: split by hand. */
    for (char *tok = copy[0] == '/' ? copy + 1 : NULL; tok != NULL && at;) {
        char *slash = strchr(tok, '/');
        if (slash != NULL) *slash = '\0';
        ok = pointer_unescape(tok);
        at = ok ? pointer_step(at, tok) : NULL;
        tok = slash != NULL ? slash + 1 : NULL;
    }
    free(copy);
    if (at == NULL)
        cfail(c, "$ref \"%.80s\" points to nothing in this schema", ref);
    return at;
}

static node *find_node(const schema_t *s, const cJSON *src) {
    for (size_t i = 0; i < s->n; i++)
        if (s->nodes[i]->src == src) return s->nodes[i];
    return NULL;
}

/* Resolves every $ref, compiling targets that are not schemas yet; new
 * nodes join the list and are resolved in turn. */
static bool resolve_refs(compiler *c) {
    for (size_t i = 0; i < c->s->n; i++) {
        node *nd = c->s->nodes[i];
        if (nd->ref == NULL) continue;

        c->plen = 0;
        c->path[0] = '\0';
        path_push(c, nd->ref_path);
        const cJSON *target = resolve_pointer(c, nd->ref);
        if (target == NULL) return false;
        nd->ref_node = find_node(c->s, target);
        if (nd->ref_node != NULL) continue;

        c->plen = 0;
        path_push(c, nd->ref);
        c->depth = 0;
        nd->ref_node = compile_node(c, target);
        if (nd->ref_node == NULL) return false;
    }
    return true;
}

/* Is v nested deeper than `left` levels? Recursion is bounded by left. */
static bool too_deep(const cJSON *v, int left) {
    if (left < 0) return true;
    if (!cJSON_IsObject(v) && !cJSON_IsArray(v)) return false;
    for (const cJSON *e = v->child; e != NULL; e = e->next)
        if (too_deep(e, left - 1)) return true;
    return false;
}

schema_t *schema_compile(const cJSON *schema, char *err, size_t err_size) {
    compiler c = {.err = err, .err_size = err_size};

    if (err != NULL && err_size > 0) err[0] = '\0';
    if (schema == NULL || too_deep(schema, 2 * SCHEMA_MAX_NESTING)) {
        cfail(&c, schema ? "schema nested too deeply" : "no schema given");
        return NULL;
    }

    c.s = calloc(1, sizeof *c.s);
    if (c.s == NULL || (c.s->doc = cJSON_Duplicate(schema, true)) == NULL ||
        (c.s->mctx = pcre2_match_context_create(NULL)) == NULL) {
        cfail(&c, "out of memory compiling the schema");
        schema_free(c.s);
        return NULL;
    }
    pcre2_set_match_limit(c.s->mctx, SCHEMA_PATTERN_MATCH_LIMIT);
    pcre2_set_depth_limit(c.s->mctx, SCHEMA_PATTERN_DEPTH_LIMIT);
    pcre2_set_heap_limit(c.s->mctx, SCHEMA_PATTERN_HEAP_LIMIT);

    c.s->root = compile_node(&c, c.s->doc);
    if (c.s->root == NULL || !resolve_refs(&c)) {
        schema_free(c.s);
        return NULL;
    }
    return c.s;
}

void schema_free(schema_t *s) {
    if (s == NULL) return;
    for (size_t i = 0; i < s->n; i++) {
        node *nd = s->nodes[i];
        pcre2_code_free(nd->pattern);
        free(nd->ref_path);
        free(nd->prop_names);
        free(nd->prop_nodes);
        free(nd->prefix.v);
        free(nd->all_of.v);
        free(nd->any_of.v);
        free(nd->one_of.v);
        free(nd);
    }
    free(s->nodes);
    pcre2_match_context_free(s->mctx);
    cJSON_Delete(s->doc);
    free(s);
}

/* ---- validating ---- */

typedef struct {
    const char *key; /* a member name, or NULL for an index */
    size_t index;
} segment;

typedef struct {
    const schema_t *s;
    const char *root;
    char *err;
    size_t err_size;
    int quiet;  /* > 0 inside anyOf/oneOf/not: failures are expected */
    bool fatal; /* a limit was hit: everything fails from here */
    bool written;
    int depth;
    long steps;
    pcre2_match_data *md;
    segment path[SCHEMA_MAX_EVAL_DEPTH + 1];
    int plen;
} vctx;

static bool is_ident(const char *k) {
    if (!((*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') || *k == '_'))
        return false;
    for (; *k != '\0'; k++)
        if (!((*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') ||
              (*k >= '0' && *k <= '9') || *k == '_' || *k == '-'))
            return false;
    return true;
}

/* Writes the instance path (root.a[2]["b c"]) into out. */
static size_t format_path(const vctx *v, char *out, size_t n) {
    size_t len = 0;

#define PUT(...)                                                               \
    do {                                                                       \
        int w_ = snprintf(out + len, n - len, __VA_ARGS__);                    \
        if (w_ > 0) len = len + (size_t)w_ >= n ? n - 1 : len + (size_t)w_;    \
    } while (0)
    PUT("%s", v->root);
    for (int i = 0; i < v->plen && len + 1 < n; i++) {
        const segment *sg = &v->path[i];
        if (sg->key == NULL) {
            PUT("[%zu]", sg->index);
        } else if (is_ident(sg->key)) {
            PUT(".%.80s", sg->key);
        } else {
            PUT("[\"");
            for (const char *k = sg->key; *k && len + 4 < n; k++) {
                unsigned char ch = (unsigned char)*k;
                if (ch == '"' || ch == '\\')
                    PUT("\\%c", ch);
                else if (ch < 0x20)
                    PUT("\\u%04x", ch);
                else
                    PUT("%c", ch);
            }
            PUT("\"]");
        }
    }
#undef PUT
    return len;
}

static bool vfail(vctx *v, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static bool vfail(vctx *v, const char *fmt, ...) {
    if (v->quiet > 0 || v->written || v->err == NULL || v->err_size == 0)
        return false;

    size_t len = format_path(v, v->err, v->err_size);
    if (len + 3 < v->err_size) {
        memcpy(v->err + len, ": ", 3);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(v->err + len + 2, v->err_size - len - 2, fmt, ap);
        va_end(ap);
    }
    v->written = true;
    return false;
}

/* A limit: the message is written even when quiet, and all fails. */
static bool vlimit(vctx *v, const char *what) {
    int quiet = v->quiet;

    v->fatal = true;
    v->quiet = 0;
    v->written = false;
    vfail(v, "%s", what);
    v->quiet = quiet;
    return false;
}

static bool step(vctx *v, long n) {
    v->steps += n;
    if (v->steps <= SCHEMA_MAX_STEPS) return true;
    if (!v->fatal)
        vlimit(v, "validation needs too much work (over the step limit); "
                  "simplify the schema or the value");
    return false;
}

static unsigned instance_types(const cJSON *x) {
    if (cJSON_IsNull(x)) return T_NULL;
    if (cJSON_IsBool(x)) return T_BOOLEAN;
    if (cJSON_IsObject(x)) return T_OBJECT;
    if (cJSON_IsArray(x)) return T_ARRAY;
    if (cJSON_IsString(x)) return T_STRING;
    if (cJSON_IsNumber(x)) {
        double d = x->valuedouble;
        return isfinite(d) && floor(d) == d ? T_NUMBER | T_INTEGER : T_NUMBER;
    }
    return 0;
}

/* Deep equality; numbers by value, object members in any order. */
static bool equal(vctx *v, const cJSON *a, const cJSON *b, int depth) {
    if (!step(v, 1)) return false;
    if (depth > SCHEMA_MAX_EVAL_DEPTH) {
        vlimit(v, "values nested too deeply to compare");
        return false;
    }
    if (cJSON_IsNumber(a) && cJSON_IsNumber(b))
        return a->valuedouble == b->valuedouble;
    if ((a->type & 0xFF) != (b->type & 0xFF)) return false;
    if (cJSON_IsString(a)) return strcmp(a->valuestring, b->valuestring) == 0;
    if (cJSON_IsArray(a)) {
        const cJSON *x = a->child, *y = b->child;
        for (; x != NULL && y != NULL; x = x->next, y = y->next)
            if (!equal(v, x, y, depth + 1)) return false;
        return x == NULL && y == NULL;
    }
    if (cJSON_IsObject(a)) {
        if (cJSON_GetArraySize(a) != cJSON_GetArraySize(b)) return false;
        for (const cJSON *x = a->child; x != NULL; x = x->next) {
            const cJSON *y = cJSON_GetObjectItemCaseSensitive(b, x->string);
            if (y == NULL || !step(v, cJSON_GetArraySize(b)) ||
                !equal(v, x, y, depth + 1))
                return false;
        }
        return true;
    }
    return true; /* null, true, false */
}

static bool validate(vctx *v, const node *nd, const cJSON *x);

/* Validates a child value: path extended by a key or an index. */
static bool validate_at(vctx *v, const node *nd, const cJSON *x,
                        const char *key, size_t index) {
    v->path[v->plen].key = key;
    v->path[v->plen].index = index;
    v->plen++;
    bool ok = validate(v, nd, x);
    v->plen--;
    return ok;
}

static void type_list(unsigned types, char *out, size_t n) {
    size_t len = 0;
    unsigned count = 0, seen = 0;

    for (unsigned t = types; t; t &= t - 1)
        count++;
    out[0] = '\0';
    for (size_t i = 0; i < sizeof type_names / sizeof *type_names; i++) {
        if (!(types & (1u << i))) continue;
        seen++;
        const char *sep = seen == 1       ? ""
                          : seen == count ? (count == 2 ? " or " : ", or ")
                                          : ", ";
        int w = snprintf(out + len, n - len, "%s%s", sep, type_names[i]);
        if (w > 0 && len + (size_t)w < n) len += (size_t)w;
    }
}

static bool check_number(vctx *v, const node *nd, double d) {
    if ((nd->num_flags & N_MIN) && !(d >= nd->minimum))
        return vfail(v, "must be >= %.15g", nd->minimum);
    if ((nd->num_flags & N_MAX) && !(d <= nd->maximum))
        return vfail(v, "must be <= %.15g", nd->maximum);
    if ((nd->num_flags & N_XMIN) && !(d > nd->xminimum))
        return vfail(v, "must be > %.15g", nd->xminimum);
    if ((nd->num_flags & N_XMAX) && !(d < nd->xmaximum))
        return vfail(v, "must be < %.15g", nd->xmaximum);
    if (!(nd->num_flags & N_MULT)) return true;

    /* Integers divide exactly (fmod is exact); otherwise the quotient
     * must be within a relative 1e-9 of a whole number, and a quotient
     * that overflows is never a multiple. */
    double m = nd->multiple_of, q = d / m;
    bool ok;
    if (floor(m) == m && floor(d) == d)
        ok = fmod(d, m) == 0;
    else
        ok = isfinite(q) && fabs(q - nearbyint(q)) <= 1e-9 * fmax(1.0, fabs(q));
    return ok ? true : vfail(v, "must be a multiple of %.15g", m);
}

static size_t code_points(const char *s) {
    size_t n = 0;

    for (; *s != '\0'; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) n++;
    return n;
}

static bool check_pattern(vctx *v, const node *nd, const char *s) {
    if (v->md == NULL) {
        v->md = pcre2_match_data_create(1, NULL);
        if (v->md == NULL) return vlimit(v, "out of memory matching a pattern");
    }

    size_t n = strlen(s);
    if (!step(v, (long)(n / 64 + 1))) return false;
    int rc =
        pcre2_match(nd->pattern, (PCRE2_SPTR)s, n, 0, 0, v->md, v->s->mctx);
    if (rc >= 0) return true;
    if (rc == PCRE2_ERROR_NOMATCH)
        return vfail(v, "does not match pattern \"%.60s\"", nd->pattern_text);

    char what[160];
    if (rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
        rc == PCRE2_ERROR_HEAPLIMIT)
        snprintf(what, sizeof what,
                 "pattern \"%.60s\" gave up on this string (match limit "
                 "reached)",
                 nd->pattern_text);
    else if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
        snprintf(what, sizeof what, "string is not valid UTF-8");
    else
        snprintf(what, sizeof what, "pattern \"%.60s\" failed (PCRE2 %d)",
                 nd->pattern_text, rc);
    return vlimit(v, what);
}

static bool check_string(vctx *v, const node *nd, const char *s) {
    if (nd->min_length >= 0 || nd->max_length >= 0) {
        double n = (double)code_points(s);
        if (nd->min_length >= 0 && n < nd->min_length)
            return vfail(v, "must be at least %.0f characters long",
                         nd->min_length);
        if (nd->max_length >= 0 && n > nd->max_length)
            return vfail(v, "must be at most %.0f characters long",
                         nd->max_length);
    }
    if (nd->pattern != NULL) return check_pattern(v, nd, s);
    return true;
}

static bool check_array(vctx *v, const node *nd, const cJSON *x) {
    double count = (double)cJSON_GetArraySize(x);
    size_t i = 0;

    if (nd->min_items >= 0 && count < nd->min_items)
        return vfail(v, "must have at least %.0f items", nd->min_items);
    if (nd->max_items >= 0 && count > nd->max_items)
        return vfail(v, "must have at most %.0f items", nd->max_items);

    for (const cJSON *e = x->child; e != NULL; e = e->next, i++) {
        const node *sub = i < nd->prefix.n ? nd->prefix.v[i] : nd->items;
        if (sub != NULL && !validate_at(v, sub, e, NULL, i)) return false;
    }

    if (!nd->unique_items) return true;
    i = 0;
    for (const cJSON *a = x->child; a != NULL; a = a->next, i++) {
        size_t j = i + 1;
        for (const cJSON *b = a->next; b != NULL; b = b->next, j++) {
            if (equal(v, a, b, 0))
                return vfail(v,
                             "items [%zu] and [%zu] are equal (items "
                             "must be unique)",
                             i, j);
            if (v->fatal) return false;
        }
    }
    return true;
}

static const node *find_property(const node *nd, const char *name) {
    size_t lo = 0, hi = nd->nprops;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, nd->prop_names[mid]);
        if (c == 0) return nd->prop_nodes[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

static bool check_object(vctx *v, const node *nd, const cJSON *x) {
    double count = (double)cJSON_GetArraySize(x);

    if (nd->min_props >= 0 && count < nd->min_props)
        return vfail(v, "must have at least %.0f properties", nd->min_props);
    if (nd->max_props >= 0 && count > nd->max_props)
        return vfail(v, "must have at most %.0f properties", nd->max_props);

    if (nd->required != NULL) {
        for (const cJSON *r = nd->required->child; r != NULL; r = r->next) {
            if (!step(v, (long)count + 1)) return false;
            if (cJSON_GetObjectItemCaseSensitive(x, r->valuestring) == NULL)
                return vfail(v, "missing required property \"%.80s\"",
                             r->valuestring);
        }
    }

    for (const cJSON *m = x->child; m != NULL; m = m->next) {
        const node *sub = find_property(nd, m->string);
        if (sub == NULL && nd->additional != NULL &&
            nd->additional->boolean == 0) {
            v->path[v->plen++] = (segment){m->string, 0};
            vfail(v, "property not allowed");
            v->plen--;
            return false;
        }
        if (sub == NULL) sub = nd->additional;
        if (sub != NULL && !validate_at(v, sub, m, m->string, 0)) return false;
    }
    return true;
}

static bool check_applicators(vctx *v, const node *nd, const cJSON *x) {
    for (size_t i = 0; i < nd->all_of.n; i++)
        if (!validate(v, nd->all_of.v[i], x)) return false;

    if (nd->any_of.n > 0) {
        bool any = false;
        v->quiet++;
        for (size_t i = 0; i < nd->any_of.n && !any && !v->fatal; i++)
            any = validate(v, nd->any_of.v[i], x);
        v->quiet--;
        if (v->fatal) return false;
        if (!any) return vfail(v, "matches none of the schemas in anyOf");
    }

    if (nd->one_of.n > 0) {
        size_t first = 0, passed = 0;
        v->quiet++;
        for (size_t i = 0; i < nd->one_of.n && passed < 2 && !v->fatal; i++)
            if (validate(v, nd->one_of.v[i], x) && passed++ == 0) first = i;
        v->quiet--;
        if (v->fatal) return false;
        if (passed == 0)
            return vfail(v, "matches none of the schemas in oneOf");
        if (passed > 1)
            return vfail(v,
                         "matches more than one schema in oneOf "
                         "(oneOf[%zu] and another)",
                         first);
    }

    if (nd->not_ != NULL) {
        v->quiet++;
        bool inner = validate(v, nd->not_, x);
        v->quiet--;
        if (v->fatal) return false;
        if (inner) return vfail(v, "must not match the schema in not");
    }
    return true;
}

static bool validate_node(vctx *v, const node *nd, const cJSON *x) {
    if (nd->boolean >= 0)
        return nd->boolean ? true : vfail(v, "no value is allowed here");
    if (nd->ref_node != NULL && !validate(v, nd->ref_node, x)) return false;

    unsigned t = instance_types(x);
    if (nd->types != 0 && !(nd->types & t)) {
        char names[96];
        type_list(nd->types, names, sizeof names);
        return vfail(v, "expected %s", names);
    }

    if (nd->enum_values != NULL) {
        bool found = false;
        for (const cJSON *e = nd->enum_values->child; e && !found; e = e->next)
            found = equal(v, e, x, 0);
        if (v->fatal) return false;
        if (!found) return vfail(v, "not one of the values allowed by enum");
    }
    if (nd->const_value != NULL && !equal(v, nd->const_value, x, 0))
        return v->fatal ? false : vfail(v, "not equal to the const value");

    if ((t & T_NUMBER) && !check_number(v, nd, x->valuedouble)) return false;
    if ((t & T_STRING) && !check_string(v, nd, x->valuestring)) return false;
    if ((t & T_ARRAY) && !check_array(v, nd, x)) return false;
    if ((t & T_OBJECT) && !check_object(v, nd, x)) return false;
    return check_applicators(v, nd, x);
}

static bool validate(vctx *v, const node *nd, const cJSON *x) {
    if (v->fatal || !step(v, 1)) return false;
    if (v->depth >= SCHEMA_MAX_EVAL_DEPTH || v->plen >= SCHEMA_MAX_EVAL_DEPTH)
        return vlimit(v, "schema evaluation nested too deeply (a $ref "
                         "cycle, or a value nested too deeply)");

    v->depth++;
    bool ok = validate_node(v, nd, x);
    v->depth--;
    return ok && !v->fatal;
}

bool schema_validate(const schema_t *s, const cJSON *instance, const char *root,
                     char *err, size_t err_size) {
    vctx *v = calloc(1, sizeof *v);

    if (err != NULL && err_size > 0) err[0] = '\0';
    if (s == NULL) {
        free(v);
        if (err != NULL && err_size > 0)
            snprintf(err, err_size, "no compiled schema given");
        return false;
    }
    if (v == NULL) {
        if (err != NULL && err_size > 0)
            snprintf(err, err_size, "out of memory validating");
        return false;
    }
    v->s = s;
    v->root = root != NULL ? root : "instance";
    v->err = err;
    v->err_size = err_size;

    bool ok = instance != NULL && validate(v, s->root, instance);
    if (instance == NULL && err != NULL && err_size > 0)
        snprintf(err, err_size, "%s: no value given", v->root);
    pcre2_match_data_free(v->md);
    free(v);
    return ok;
}
