/* schema: JSON Schema (a draft 2020-12 subset) compiled once, then used to
 * validate parsed cJSON values such as tool arguments.
 *
 * Supported: type, properties, required, additionalProperties, items,
 * prefixItems, enum, const, minimum, maximum, exclusiveMinimum,
 * exclusiveMaximum, multipleOf, minLength, maxLength, pattern, minItems,
 * maxItems, uniqueItems, minProperties, maxProperties, allOf, anyOf, oneOf,
 * not, $defs/definitions, local $ref ("#", "#/json/pointer"), boolean
 * schemas. Accepted and ignored: title, description, default, examples,
 * deprecated, readOnly, writeOnly, $comment, $schema, format,
 * contentMediaType, contentEncoding, and $id at the root. Anything else is
 * refused by schema_compile, so a schema that compiles is enforced whole.
 * doc/schema.md has the details.
 *
 * Threads: schema_compile and schema_free from any thread; a compiled
 * schema is read-only, so any number of threads may call schema_validate
 * on it at once. */
#ifndef NETRA_SCHEMA_H
#define NETRA_SCHEMA_H

#include <stdbool.h>
#include <stddef.h>

#include <cJSON.h>

typedef struct schema schema_t;

/* How deep schema objects may nest inside one another. */
#define SCHEMA_MAX_NESTING 128

/* How deep one validation may descend (instance levels plus in-place
 * steps such as $ref and allOf); past it validation fails, which is how a
 * $ref cycle that never consumes input ends. */
#define SCHEMA_MAX_EVAL_DEPTH 256

/* Work allowed for one validation (schema nodes visited plus values
 * compared); past it validation fails rather than running on. */
#define SCHEMA_MAX_STEPS 20000000L

/* PCRE2 limits for each pattern match: match() calls, backtracking depth
 * and heap (KiB). A pattern that hits one fails validation. */
#define SCHEMA_PATTERN_MATCH_LIMIT 1000000u
#define SCHEMA_PATTERN_DEPTH_LIMIT 10000u
#define SCHEMA_PATTERN_HEAP_LIMIT 8192u

/* Compiles `schema` (an object or a boolean; it is copied, the caller
 * keeps its own). Patterns are compiled here, $refs resolved here.
 *
 * Returns a schema to free with schema_free, or NULL with a message in
 * err (always terminated when err_size > 0) naming the place in the schema
 * and the reason, e.g.
 *   unsupported keyword "$dynamicRef" at properties.x
 *   bad pattern at properties.id.pattern: missing closing parenthesis
 *     at offset 3
 * Messages about keywords or $ref forms this module does not implement
 * start with "unsupported "; any other message means the schema itself
 * is wrong (a bad value for a keyword, a $ref that points nowhere). */
schema_t *schema_compile(const cJSON *schema, char *err, size_t err_size);

/* Validates `instance` against `schema`. Returns true if it is valid.
 * Returns false with a message in err naming the failing place in the
 * instance, rooted at `root` (NULL means "instance"):
 *   arguments.items[2].name: expected string
 *   arguments: missing required property "name"
 * Hitting a limit (SCHEMA_MAX_EVAL_DEPTH, SCHEMA_MAX_STEPS, a pattern
 * limit) also returns false, with a message that says which. Allocates
 * only for pattern matching; on memory failure it returns false. */
bool schema_validate(const schema_t *schema, const cJSON *instance,
                     const char *root, char *err, size_t err_size);

/* Frees a compiled schema; NULL is fine. No validation may be running on
 * it. */
void schema_free(schema_t *schema);

#endif
