/* eventlog: the local JSON-lines file that analytics events go to when
 * ClickHouse is disabled by policy. One JSON object per line, appended to
 * DIR/events.jsonl; past a size the file is rotated to events.jsonl.1
 * (older ones shift to .2, .3, ...; only `keep` old files are kept).
 * Nothing written here is ever replayed anywhere.
 *
 * One process owns a directory's log: evlog_open takes an exclusive flock
 * on DIR/<name>.lock holding its pid. A line is written whole or not at
 * all: a failed write is cut off again, and a line left torn by a crash is
 * closed with a newline on the next open, so every later line starts
 * clean.
 *
 * Threads: an evlog is used by one thread at a time; nothing here locks. */
#ifndef NETRA_EVENTLOG_H
#define NETRA_EVENTLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    EVLOG_OK = 0,
    EVLOG_EINVAL = -1,  /* the line was rejected; nothing written */
    EVLOG_EIO = -2,     /* a file operation failed; see the message */
    EVLOG_ELOCKED = -3, /* evlog_open: another opener holds the lock */
    EVLOG_ENOMEM = -4,
} evlog_result;

#define EVLOG_DEFAULT_NAME "events.jsonl"
#define EVLOG_DEFAULT_MAX_BYTES (64ull * 1024 * 1024)
#define EVLOG_DEFAULT_KEEP 5
#define EVLOG_LINE_MAX (16u * 1024 * 1024)
#define EVLOG_KEEP_MAX 1000

typedef struct {
    const char *dir;    /* must exist and be writable; copied */
    const char *name;   /* file name, no '/'; NULL: EVLOG_DEFAULT_NAME */
    uint64_t max_bytes; /* rotate before a line would take the file past
                           this; 0: EVLOG_DEFAULT_MAX_BYTES. A single line
                           longer than this gets a file of its own. */
    int keep;           /* rotated files kept, 0 to EVLOG_KEEP_MAX; 0
                           keeps none (the file starts over) */
    int sync_every;     /* fdatasync after this many lines; 0 means 1;
                           negative: never (the OS decides) */
} evlog_options;

typedef struct {
    uint64_t lines;    /* written since open */
    uint64_t bytes;    /* written since open, newlines included */
    uint64_t rejected; /* lines refused with EVLOG_EINVAL */
    uint64_t rotations;
    uint64_t file_bytes; /* size of the current file */
} evlog_stats;

typedef struct evlog evlog;

/* Opens (creating if needed) DIR/name for appending and takes the lock.
 * Returns EVLOG_OK and sets *out, or an error with err filled and *out
 * NULL: EVLOG_EIO when the directory is missing, not a directory or not
 * writable (the message names the path and what to do), EVLOG_ELOCKED
 * (names the holder's pid), EVLOG_EINVAL for bad options, EVLOG_ENOMEM.
 * err may be NULL. Free with evlog_close. */
int evlog_open(const evlog_options *opt, evlog **out, char *err,
               size_t err_size);

/* Syncs (unless sync_every is negative), closes, releases the lock.
 * NULL is fine. */
void evlog_close(evlog *ev);

/* Appends one line: `line` (len bytes, no newline of its own) and a
 * newline. The text must look like one JSON object: it starts with '{'
 * and ends with '}' (surrounding blanks allowed) and holds no raw newline,
 * carriage return or NUL byte; it is not parsed further. Rotates first
 * when the line would take the file past max_bytes. Returns EVLOG_OK,
 * EVLOG_EINVAL (bad line; counted in rejected) or EVLOG_EIO (nothing of
 * the line stays in the file). */
int evlog_append(evlog *ev, const char *line, size_t len);

/* Syncs the current file now. EVLOG_OK or EVLOG_EIO. */
int evlog_sync(evlog *ev);

/* Copies the counters. Can't fail. */
void evlog_get_stats(const evlog *ev, evlog_stats *out);

/* The message of the last failure ("" if none). */
const char *evlog_error(const evlog *ev);

#endif
