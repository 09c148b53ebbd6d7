/* config: settings in layers (command-line flag > process environment >
 * config/<environment>.env > built-in default), typed getters, the
 * environment name, where lua/ and config/ live, and which keys are
 * secrets.
 *
 * A config is built once (config_load) and read-only afterwards, so any
 * thread may read it. A reload builds a new one. */
#ifndef NETRA_CONFIG_H
#define NETRA_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

typedef struct config config;

/* Where a value came from. */
typedef enum {
    CONFIG_UNSET = 0,
    CONFIG_DEFAULT,
    CONFIG_FILE,
    CONFIG_ENVIRONMENT,
    CONFIG_FLAG,
} config_source;

/* Returns a new config with no layers, or NULL when out of memory.
 * Set flags and defaults with config_set, then call config_load. */
config *config_new(void);
void config_free(config *cfg);

/* Sets a value in the flag or default layer. Returns 0, or -1 when out
 * of memory. */
int config_set(config *cfg, config_source layer, const char *key,
               const char *value);

/* Loads the layers: snapshots the process environment, picks the
 * environment name (--env flag, then ENVIRONMENT, then "development"),
 * finds the home directory (NETRA_HOME, then the current directory if it
 * holds lua/netra/policy.lua, then the install prefix) and reads
 * <home>/config/<environment>.env if it exists. Returns 0, or -1 with err
 * filled (an unknown environment name lists the valid ones; a malformed
 * env file line names file and line). */
int config_load(config *cfg, char *err, size_t err_size);

/* The value of key, or NULL when unset or empty in every layer. */
const char *config_get(const config *cfg, const char *key);

/* The value, or def when unset. */
const char *config_get_or(const config *cfg, const char *key,
                          const char *def);

/* The layer a key's value came from (CONFIG_UNSET when unset). */
config_source config_source_of(const config *cfg, const char *key);

/* "flag", "environment", "config/<env>.env", "default" or "unset". */
const char *config_source_name(const config *cfg, config_source source);

/* Parses a boolean: true/false/1/0/yes/no/on/off, any case. */
bool config_parse_bool(const char *text, bool *out);

/* Typed getters: fill *out with the value or def when unset; return -1
 * with err filled when set but not of that type ("NETRA_WORKERS: expected
 * an integer, got 'four'"). */
int config_bool(const config *cfg, const char *key, bool def, bool *out,
                char *err, size_t err_size);
int config_int(const config *cfg, const char *key, long def, long min,
               long max, long *out, char *err, size_t err_size);

/* True when a key names a secret (ends in _PASSWORD, _SECRET, _TOKEN or
 * _KEY); such values are never logged. */
bool config_is_secret(const char *key);

/* The environment name and the home directory (lua/ and config/). */
const char *config_environment(const config *cfg);
const char *config_home(const config *cfg);

/* True when name is development, test, staging or production. */
bool config_environment_valid(const char *name);

/* config_get with the shape of a settings getter (ud is the config), for
 * parts that read settings by name (clickhouse.h's ch_getter). */
const char *config_getter(void *cfg, const char *key);

/* Calls fn for every key that has a value, in sorted order. */
void config_each(const config *cfg,
                 void (*fn)(void *ud, const char *key, const char *value,
                            config_source source),
                 void *ud);

/* Parses one env file into the file layer (exposed for tests). Returns
 * 0, or -1 with err "path:line: reason". */
int config_read_file(config *cfg, const char *path, char *err,
                     size_t err_size);

#endif
