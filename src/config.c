/* config: layered settings (see config.h). */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

#define LAYERS 5 /* indexed by config_source; slot 0 unused */

typedef struct {
    char *key;
    char *value[LAYERS];
} entry;

struct config {
    entry *entries;
    size_t count, cap;
    char environment[32];
    char home[PATH_MAX];
    char file_name[64]; /* "config/<env>.env" */
};

static const char *valid_environments[] = {"development", "test", "staging",
                                           "production"};

config *config_new(void) {
    return calloc(1, sizeof(config));
}

void config_free(config *cfg) {
    if (!cfg) return;
    for (size_t i = 0; i < cfg->count; i++) {
        free(cfg->entries[i].key);
        for (int l = 0; l < LAYERS; l++) free(cfg->entries[i].value[l]);
    }
    free(cfg->entries);
    free(cfg);
}

static entry *find(const config *cfg, const char *key) {
    for (size_t i = 0; i < cfg->count; i++)
        if (!strcmp(cfg->entries[i].key, key)) return &cfg->entries[i];
    return NULL;
}

int config_set(config *cfg, config_source layer, const char *key,
               const char *value) {
    entry *e = find(cfg, key);
    if (!e) {
        if (cfg->count == cfg->cap) {
            size_t cap = cfg->cap ? cfg->cap * 2 : 64;
            entry *grown = realloc(cfg->entries, cap * sizeof(entry));
            if (!grown) return -1;
            cfg->entries = grown;
            cfg->cap = cap;
        }
        e = &cfg->entries[cfg->count];
        memset(e, 0, sizeof *e);
        e->key = strdup(key);
        if (!e->key) return -1;
        cfg->count++;
    }
    char *copy = value ? strdup(value) : NULL;
    if (value && !copy) return -1;
    free(e->value[layer]);
    e->value[layer] = copy;
    return 0;
}

config_source config_source_of(const config *cfg, const char *key) {
    const entry *e = find(cfg, key);
    if (!e) return CONFIG_UNSET;
    for (int l = CONFIG_FLAG; l >= CONFIG_DEFAULT; l--)
        if (e->value[l] && e->value[l][0]) return (config_source)l;
    return CONFIG_UNSET;
}

const char *config_get(const config *cfg, const char *key) {
    config_source s = config_source_of(cfg, key);
    return s == CONFIG_UNSET ? NULL : find(cfg, key)->value[s];
}

const char *config_getter(void *cfg, const char *key) {
    return config_get(cfg, key);
}

const char *config_get_or(const config *cfg, const char *key,
                          const char *def) {
    const char *v = config_get(cfg, key);
    return v ? v : def;
}

const char *config_source_name(const config *cfg, config_source source) {
    switch (source) {
    case CONFIG_FLAG: return "flag";
    case CONFIG_ENVIRONMENT: return "environment";
    case CONFIG_FILE: return cfg->file_name;
    case CONFIG_DEFAULT: return "default";
    default: return "unset";
    }
}

bool config_parse_bool(const char *text, bool *out) {
    static const char *yes[] = {"true", "1", "yes", "on"};
    static const char *no[] = {"false", "0", "no", "off"};
    if (!text) return false;
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(text, yes[i])) {
            *out = true;
            return true;
        }
        if (!strcasecmp(text, no[i])) {
            *out = false;
            return true;
        }
    }
    return false;
}

int config_bool(const config *cfg, const char *key, bool def, bool *out,
                char *err, size_t err_size) {
    const char *v = config_get(cfg, key);
    if (!v) {
        *out = def;
        return 0;
    }
    if (config_parse_bool(v, out)) return 0;
    snprintf(err, err_size,
             "%s: expected a boolean (true/false/1/0/yes/no/on/off), "
             "got '%s' (from %s)",
             key, v, config_source_name(cfg, config_source_of(cfg, key)));
    return -1;
}

int config_int(const config *cfg, const char *key, long def, long min,
               long max, long *out, char *err, size_t err_size) {
    const char *v = config_get(cfg, key);
    if (!v) {
        *out = def;
        return 0;
    }
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || end == v || *end) {
        snprintf(err, err_size, "%s: expected an integer, got '%s' (from %s)",
                 key, v, config_source_name(cfg, config_source_of(cfg, key)));
        return -1;
    }
    if (n < min || n > max) {
        snprintf(err, err_size, "%s: %ld is out of range, use %ld to %ld",
                 key, n, min, max);
        return -1;
    }
    *out = n;
    return 0;
}

bool config_is_secret(const char *key) {
    static const char *suffixes[] = {"_PASSWORD", "_SECRET", "_TOKEN",
                                     "_KEY"};
    size_t n = strlen(key);
    for (int i = 0; i < 4; i++) {
        size_t s = strlen(suffixes[i]);
        if (n >= s && !strcmp(key + n - s, suffixes[i])) return true;
    }
    return false;
}

bool config_environment_valid(const char *name) {
    for (int i = 0; i < 4; i++)
        if (name && !strcmp(name, valid_environments[i])) return true;
    return false;
}

const char *config_environment(const config *cfg) {
    return cfg->environment;
}

const char *config_home(const config *cfg) {
    return cfg->home;
}

static bool key_valid(const char *k, size_t n) {
    if (n == 0 || !(isupper((unsigned char)k[0]) || k[0] == '_'))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!(isupper((unsigned char)k[i]) || isdigit((unsigned char)k[i]) ||
              k[i] == '_'))
            return false;
    return true;
}

/* Parses the value part of an env line into out (size n). Returns NULL
 * on success or the reason it is malformed. */
static const char *parse_value(const char *p, char *out, size_t n) {
    size_t len = 0;
    while (*p == ' ' || *p == '\t') p++;
    if (*p == '"' || *p == '\'') {
        char q = *p++;
        while (*p && *p != q) {
            char c = *p++;
            if (q == '"' && c == '\\' && *p) {
                c = *p++;
                if (c == 'n') c = '\n';
                else if (c == 't') c = '\t';
                else if (c != '"' && c != '\\' && c != '$')
                    return "unknown escape in double-quoted value";
            }
            if (len + 1 >= n) return "value too long";
            out[len++] = c;
        }
        if (*p != q) return "unterminated quoted value";
        p++;
        while (*p == ' ' || *p == '\t') p++;
        if (*p && *p != '#') return "unexpected text after the closing quote";
    } else {
        while (*p == ' ' || *p == '\t') p++;
        while (*p && !((*p == '#') && len > 0 && isspace((unsigned char)p[-1]))) {
            if (len + 1 >= n) return "value too long";
            out[len++] = *p++;
        }
        while (len > 0 && isspace((unsigned char)out[len - 1])) len--;
        for (size_t i = 0; i < len; i++)
            if (out[i] == '"' || out[i] == '\'')
                return "quotes inside an unquoted value; quote the whole value";
    }
    out[len] = '\0';
    return NULL;
}

int config_read_file(config *cfg, const char *path, char *err,
                     size_t err_size) {
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
        snprintf(err, err_size, "%s: not a regular file", path);
        return -1;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, err_size, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    char line[8192], value[8192];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        size_t n = strlen(line);
        if (n == sizeof line - 1 && line[n - 1] != '\n') {
            snprintf(err, err_size, "%s:%d: line longer than 8 KiB", path,
                     lineno);
            rc = -1;
            break;
        }
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            line[--n] = '\0';
        char *p = line;
        if (lineno == 1 && !memcmp(p, "\xEF\xBB\xBF", 3)) p += 3; /* BOM */
        while (isspace((unsigned char)*p)) p++;
        if (!*p || *p == '#') continue;
        if (!strncmp(p, "export", 6) && (p[6] == ' ' || p[6] == '\t')) {
            p += 6;
            while (*p == ' ' || *p == '\t') p++;
        }
        char *eq = strchr(p, '=');
        const char *why = NULL;
        if (!eq) why = "expected KEY=VALUE";
        else if (!key_valid(p, (size_t)(eq - p)))
            why = "the key must be upper case letters, digits and _ "
                  "(no spaces around =)";
        else why = parse_value(eq + 1, value, sizeof value);
        if (why) {
            snprintf(err, err_size, "%s:%d: %s", path, lineno, why);
            rc = -1;
            break;
        }
        *eq = '\0';
        if (config_set(cfg, CONFIG_FILE, p, value) < 0) {
            snprintf(err, err_size, "%s:%d: out of memory", path, lineno);
            rc = -1;
            break;
        }
    }
    fclose(f);
    return rc;
}

static bool has_policy(const char *dir) {
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%.*s/lua/netra/policy.lua", PATH_MAX, dir);
    return access(path, R_OK) == 0;
}

static int find_home(config *cfg, char *err, size_t err_size) {
    const char *home = config_get(cfg, "NETRA_HOME");
    if (home) {
        if (!has_policy(home)) {
            snprintf(err, err_size,
                     "NETRA_HOME=%s has no lua/netra/policy.lua - point it "
                     "at the directory that holds lua/ and config/",
                     home);
            return -1;
        }
        snprintf(cfg->home, sizeof cfg->home, "%s", home);
        return 0;
    }
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof cwd) && has_policy(cwd)) {
        snprintf(cfg->home, sizeof cfg->home, "%s", cwd);
        return 0;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char prefix[PATH_MAX + 32];
            snprintf(prefix, sizeof prefix, "%s/../share/netra", exe);
            char real[PATH_MAX];
            if (has_policy(prefix) && realpath(prefix, real)) {
                snprintf(cfg->home, sizeof cfg->home, "%s", real);
                return 0;
            }
        }
    }
    if (has_policy(NETRA_DATADIR)) {
        snprintf(cfg->home, sizeof cfg->home, "%s", NETRA_DATADIR);
        return 0;
    }
    snprintf(err, err_size,
             "cannot find lua/netra/policy.lua in NETRA_HOME, the current "
             "directory, <binary>/../share/netra or %s - set NETRA_HOME "
             "to the directory that holds lua/ and config/, or run "
             "`cmake --install`",
             NETRA_DATADIR);
    return -1;
}

int config_load(config *cfg, char *err, size_t err_size) {
    for (char **e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e) continue;
        char key[256];
        size_t n = (size_t)(eq - *e);
        if (n >= sizeof key) continue;
        memcpy(key, *e, n);
        key[n] = '\0';
        if (config_set(cfg, CONFIG_ENVIRONMENT, key, eq + 1) < 0) {
            snprintf(err, err_size, "out of memory reading the environment");
            return -1;
        }
    }

    if (config_set(cfg, CONFIG_DEFAULT, "ENVIRONMENT", "development") < 0) {
        snprintf(err, err_size, "out of memory");
        return -1;
    }
    const char *env = config_get(cfg, "ENVIRONMENT");
    if (!config_environment_valid(env)) {
        snprintf(err, err_size,
                 "unknown environment '%s' - use one of development, test, "
                 "staging, production",
                 env);
        return -1;
    }
    snprintf(cfg->environment, sizeof cfg->environment, "%s", env);
    snprintf(cfg->file_name, sizeof cfg->file_name, "config/%s.env", env);

    if (find_home(cfg, err, err_size) < 0) return -1;

    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/config/%s.env", cfg->home, env);
    if (access(path, F_OK) == 0 &&
        config_read_file(cfg, path, err, err_size) < 0)
        return -1;
    return 0;
}

static int by_key(const void *a, const void *b) {
    return strcmp((*(const entry *const *)a)->key,
                  (*(const entry *const *)b)->key);
}

void config_each(const config *cfg,
                 void (*fn)(void *ud, const char *key, const char *value,
                            config_source source),
                 void *ud) {
    const entry **sorted = malloc(cfg->count * sizeof *sorted + 1);
    if (!sorted) return;
    for (size_t i = 0; i < cfg->count; i++) sorted[i] = &cfg->entries[i];
    qsort(sorted, cfg->count, sizeof *sorted, by_key);
    for (size_t i = 0; i < cfg->count; i++) {
        config_source s = config_source_of(cfg, sorted[i]->key);
        if (s != CONFIG_UNSET)
            fn(ud, sorted[i]->key, sorted[i]->value[s], s);
    }
    free(sorted);
}
