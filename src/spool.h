/* spool: a bounded, append-only, crash-safe queue of analytics batches on
 * disk (NETRA_SPOOL_DIR), kept while ClickHouse is configured but cannot
 * take them, and replayed oldest first when it can. doc/spool.md gives
 * the byte layout.
 *
 * Guarantees. A record is accepted when spool_append returns SPOOL_OK;
 * after that, a kill -9 of the process at any moment loses no accepted
 * record, and with the default sync policy neither does a crash of the
 * machine. Every accepted record is handed out by spool_peek at least
 * once, in the order of acceptance, until spool_ack says it was
 * delivered. A crash between a delivery and its spool_ack hands the
 * record out again: replay is at least once, never exactly once. That is
 * safe for analytics because every row carries an event_id and the
 * ClickHouse tables are ReplacingMergeTree on it, so a replayed batch
 * collapses into the rows already there.
 *
 * Bounds. The segment files never grow past max_bytes: an append that
 * would cross it is refused with SPOOL_FULL and counted; nothing already
 * accepted is ever dropped to make room.
 *
 * Damage. A record that fails its checksum, or a segment cut short in the
 * middle of a record, is reported (file, offset, reason) through the
 * report callback, counted, and skipped; the records after it in the same
 * segment are recovered where a valid record can be found again, and
 * later segments are always replayed. A segment whose header is damaged
 * or of an unknown version is renamed to *.corrupt and left alone.
 *
 * Locking. One process owns a spool directory: spool_open takes an
 * exclusive flock on DIR/spool.lock and writes its pid there; a second
 * opener, in this process or another, gets SPOOL_ELOCKED and a message
 * naming the holder's pid.
 *
 * Replay. spool_peek_next hands out pending records oldest first, as
 * far ahead as the caller wants (to fill one insert from many records);
 * spool_ack_through then marks everything up to a sequence number
 * delivered. spool_peek and spool_ack are the one-record forms.
 *
 * Threads. A spool is used by one thread at a time (the analytics
 * thread); nothing here locks, so callers that share a spool between
 * threads must hold their own mutex around every call. Different spools
 * may be used on different threads. */
#ifndef NETRA_SPOOL_H
#define NETRA_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    SPOOL_OK = 0,
    SPOOL_EMPTY = 1,    /* spool_peek: nothing pending */
    SPOOL_FULL = -1,    /* spool_append: the bound would be crossed */
    SPOOL_ELOCKED = -2, /* spool_open: another opener holds the lock */
    SPOOL_EIO = -3,     /* a file operation failed; see the message */
    SPOOL_EINVAL = -4,  /* a bad argument; see the message */
    SPOOL_ETOOBIG = -5, /* spool_append: record over SPOOL_RECORD_MAX */
    SPOOL_ENOMEM = -6,
} spool_result;

#define SPOOL_DEFAULT_MAX_BYTES (1024ull * 1024 * 1024)  /* 1 GiB */
#define SPOOL_DEFAULT_SEGMENT_BYTES (8ull * 1024 * 1024) /* 8 MiB */
#define SPOOL_RECORD_MAX (64u * 1024 * 1024)             /* payload bytes */

/* Called for each damaged place found (on open, or later while
 * replaying): the file's path, the byte offset in it, and what is wrong.
 * Runs on the calling thread, inside the spool call; it must not call
 * back into the spool. */
typedef void (*spool_report_fn)(void *ud, const char *path, uint64_t offset,
                                const char *reason);

typedef struct {
    const char *dir;        /* NETRA_SPOOL_DIR; must exist; copied */
    uint64_t max_bytes;     /* NETRA_SPOOL_MAX_BYTES; 0: the default */
    uint64_t segment_bytes; /* a segment rolls past this; 0: the default */
    int sync_every;         /* fdatasync after this many appends; 0 means
                               1 (every batch); negative: never (a kill
                               of the process still loses nothing, a
                               crash of the machine may) */
    spool_report_fn report; /* NULL: a warning line via log_msg */
    void *report_ud;
} spool_options;

/* One pending record as handed out by spool_peek. data points into the
 * spool and stays valid until the next call on that spool. */
typedef struct {
    uint64_t seq;   /* increases by one per accepted record, across
                       segments and reopens */
    uint16_t kind;  /* the caller's table id, stored as given */
    uint32_t count; /* the caller's count (rows in the batch) */
    const void *data;
    size_t len;
} spool_record;

typedef struct {
    uint64_t pending_records; /* accepted, not yet acknowledged */
    uint64_t pending_bytes;   /* their bytes, framing included */
    uint64_t pending_count;   /* sum of their callers' counts */
    uint64_t disk_bytes;      /* segment file bytes: what max_bytes bounds */
    uint64_t max_bytes;
    uint32_t segments;        /* segment files in use */
    uint64_t refused_records; /* appends refused with SPOOL_FULL */
    uint64_t refused_count;   /* sum of their counts: events dropped */
    uint64_t corrupt_records; /* damaged records or regions skipped */
    uint64_t torn_tails;      /* segments that end inside a record */
    uint64_t quarantined;     /* files renamed to *.corrupt */
    uint64_t acked_seq;       /* every record up to this one delivered */
    uint64_t next_seq;        /* what the next append will get */
} spool_stats;

typedef struct spool spool;

/* Opens the spool in opt->dir: takes the lock, drops leftovers of an
 * interrupted segment creation, reads the cursor, and checks every
 * segment (reporting and counting damage, quarantining bad headers,
 * deleting segments with nothing pending). Returns SPOOL_OK and sets
 * *out, or an error with err filled and *out NULL: SPOOL_ELOCKED (the
 * message names the holder's pid), SPOOL_EIO (directory missing or not
 * writable, ...), SPOOL_EINVAL, SPOOL_ENOMEM. err may be NULL. Free with
 * spool_close. */
int spool_open(const spool_options *opt, spool **out, char *err,
               size_t err_size);

/* Writes, syncs (per sync_every) and releases the lock. NULL is fine.
 * Pending records stay on disk for the next open. */
void spool_close(spool *sp);

/* Appends one record: kind and count are the caller's, stored as given;
 * data (len bytes, may be 0) is copied. Sets *seq (may be NULL) to its
 * sequence number. Returns SPOOL_OK once the record is accepted (written
 * and, per sync_every, synced); SPOOL_FULL when it would take the segment
 * files past max_bytes (counted in refused_records and refused_count; the
 * caller keeps or drops the batch); SPOOL_ETOOBIG for a payload over
 * SPOOL_RECORD_MAX; SPOOL_EIO when writing failed (disk full, ...). On
 * any failure nothing was accepted and the spool is unchanged. */
int spool_append(spool *sp, uint16_t kind, const void *data, size_t len,
                 uint32_t count, uint64_t *seq);

/* Hands out the oldest pending record whose sequence number is above
 * `after` (0: the oldest pending record) without removing it. To read
 * ahead, pass the seq of the record last handed out; asking for an
 * earlier one reads again from the oldest pending record. Returns
 * SPOOL_OK with *out filled, SPOOL_EMPTY when there is no such record,
 * or SPOOL_EIO / SPOOL_ENOMEM. Damage met on the way is reported once
 * and skipped. Segments with nothing left pending are deleted here or
 * in spool_ack_through (one that held damage is renamed to *.corrupt
 * instead, so that it can be looked at). Records handed out are
 * remembered (about 32 bytes each) until acknowledged. */
int spool_peek_next(spool *sp, uint64_t after, spool_record *out);

/* spool_peek_next(sp, 0, out): the oldest pending record, the same one
 * again until it is acknowledged. */
int spool_peek(spool *sp, spool_record *out);

/* Marks every pending record up to and including seq delivered; seq must
 * be one handed out by spool_peek_next (a seq already acknowledged is a
 * no-op). The cursor file is replaced atomically (synced unless
 * sync_every is negative), so a delivered record is not handed out again
 * after a reopen. Returns SPOOL_OK, SPOOL_EINVAL (seq not handed out
 * yet) or SPOOL_EIO (nothing changes: the records stay pending). */
int spool_ack_through(spool *sp, uint64_t seq);

/* spool_ack_through for exactly the oldest record handed out; seq must
 * be its sequence number, else SPOOL_EINVAL. */
int spool_ack(spool *sp, uint64_t seq);

/* Syncs the current segment now, whatever sync_every says. SPOOL_OK or
 * SPOOL_EIO. */
int spool_sync(spool *sp);

/* Copies the counters. Can't fail. */
void spool_get_stats(const spool *sp, spool_stats *out);

/* The message of the last failure on this spool ("" if none). */
const char *spool_error(const spool *sp);

/* "ok", "empty", "full", ... for a spool_result. Can't fail. */
const char *spool_result_name(int code);

/* CRC-32C (Castagnoli) of len bytes, continuing from crc (0 to start).
 * The checksum of every record and header. Can't fail. */
uint32_t spool_crc32c(uint32_t crc, const void *data, size_t len);

#endif
