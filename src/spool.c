/* spool: segment files, cursor and lock of the analytics spool (see
 * spool.h; the byte layout is in doc/spool.md). */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "log.h"

#define SEG_MAGIC "NETRASPL"
#define SEG_VERSION 1u
#define SEG_HEADER 32u
#define REC_HEADER 32u
#define REC_MARKER "NSRC"
#define CUR_MAGIC "NETRACUR"
#define CUR_VERSION 1u
#define CUR_SIZE 32u

#define LOCK_NAME "spool.lock"
#define CURSOR_NAME "cursor"
#define CURSOR_TMP "cursor.tmp"
#define SEG_PREFIX "seg-"
#define SEG_SUFFIX ".spool"
#define SEG_DIGITS 20
#define SEG_NAME_MAX 64

#define SEQ_LIMIT (1ull << 62) /* larger sequence numbers are damage */
#define MIN_SEGMENT_BYTES (SEG_HEADER + REC_HEADER)
#define RESYNC_CHUNK 65536u
#define ERR_MAX 512

/* A segment file the spool knows about. The pending counts cover its
 * records that are accepted and not yet acknowledged. */
typedef struct {
    uint64_t number; /* from the file name; sets the order */
    uint64_t size;   /* bytes: the file's size, or the written end of the
                        segment being appended */
    uint64_t pend_records;
    uint64_t pend_bytes;
    uint64_t pend_count;
    uint64_t walked_to; /* damage before this offset was already reported
                           and counted */
    bool damaged;       /* damage found: rename to *.corrupt when done */
} seg_info;

/* A walk through one segment's records (open scan and replay). */
typedef struct {
    int fd;
    uint64_t number;
    uint64_t end;         /* how far the segment may be read */
    uint64_t off;         /* the next record's offset */
    uint64_t last_seq;    /* sequences must increase within a segment */
    uint64_t quiet_below; /* damage before here is not reported again */
    bool quiet;
    bool damaged;
} seg_walk;

/* A record handed out and not yet acknowledged: where it ends, and what
 * it weighs in the pending counts. */
typedef struct {
    uint64_t seq;
    uint64_t number; /* its segment */
    uint64_t end;    /* offset just past it */
    uint32_t len;
    uint32_t count;
} handed;

/* A record header as decoded. */
typedef struct {
    uint32_t len;
    uint64_t seq;
    uint16_t kind;
    uint32_t count;
    uint32_t payload_crc;
} rec_header;

struct spool {
    char *dir;
    int dir_fd;
    int lock_fd;
    uint64_t max_bytes;
    uint64_t segment_bytes;
    int sync_every;
    spool_report_fn report;
    void *report_ud;

    seg_info *segs; /* oldest first; the last one is written when wfd >= 0 */
    size_t nsegs;
    size_t cap;
    uint64_t next_number;
    int wfd;
    int unsynced;

    /* Replay. The head is where the first unacknowledged record of
     * segs[0] may start; the reader walks ahead of it, handing records
     * out, and remembers each one in `out` until it is acknowledged. */
    uint64_t head_off;
    uint64_t head_last_seq;
    size_t rd_idx; /* the reader's segment, an index into segs */
    seg_walk rd;   /* rd.fd < 0 while not open */
    handed *out;   /* handed out, oldest first, from out[out_start] */
    size_t out_start;
    size_t out_len;
    size_t out_cap;
    rec_header last; /* the newest handed out; its payload is in buf */
    bool last_valid;

    uint8_t *buf;
    size_t buf_cap;

    spool_stats st;
    char err[ERR_MAX];
};

/* ---- CRC-32C, slicing by 8 ---- */

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                              crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t spool_crc32c(uint32_t crc, const void *data, size_t len) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    uint32_t c = ~crc;

    while (len && ((uintptr_t)p & 7)) {
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                           (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
            crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
            crc_table[0][p[7]];
        p += 8;
        len -= 8;
    }
    while (len--)
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return ~c;
}

/* ---- little-endian fields ---- */

static void put16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t get32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p) {
    return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

/* ---- small helpers ---- */

static void set_err(char *err, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

#define SP_ERR(sp, ...) set_err((sp)->err, sizeof((sp)->err), __VA_ARGS__)

/* Reads exactly n bytes at off; returns n, fewer at end of file, -1. */
static ssize_t read_at(int fd, void *buf, size_t n, uint64_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r =
            pread(fd, (uint8_t *)buf + done, n - done, (off_t)(off + done));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        done += (size_t)r;
    }
    return (ssize_t)done;
}

/* Writes the two pieces whole at off; 0 or -1 with errno. */
static int write_at(int fd, const void *a, size_t alen, const void *b,
                    size_t blen, uint64_t off) {
    struct iovec iov[2] = {{(void *)a, alen}, {(void *)b, blen}};
    int n = blen ? 2 : 1;
    struct iovec *v = iov;
    while (n > 0) {
        ssize_t w = pwritev(fd, v, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        off += (uint64_t)w;
        while (n > 0 && (size_t)w >= v->iov_len) {
            w -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v->iov_base = (uint8_t *)v->iov_base + w;
            v->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static void seg_name(char *out, size_t n, uint64_t number, bool tmp) {
    snprintf(out, n, SEG_PREFIX "%0*" PRIu64 SEG_SUFFIX "%s", SEG_DIGITS,
             number, tmp ? ".tmp" : "");
}

/* Parses "seg-<20 digits>.spool" exactly. */
static bool seg_parse_name(const char *name, uint64_t *number) {
    size_t plen = strlen(SEG_PREFIX);
    if (strncmp(name, SEG_PREFIX, plen) != 0) return false;
    const char *d = name + plen;
    uint64_t v = 0;
    for (int i = 0; i < SEG_DIGITS; i++) {
        if (d[i] < '0' || d[i] > '9') return false;
        if (v > (UINT64_MAX - 9) / 10) return false;
        v = v * 10 + (uint64_t)(d[i] - '0');
    }
    if (strcmp(d + SEG_DIGITS, SEG_SUFFIX) != 0) return false;
    *number = v;
    return true;
}

static bool is_tmp_name(const char *name) {
    size_t n = strlen(name);
    return n > 4 && strcmp(name + n - 4, ".tmp") == 0 &&
           (strncmp(name, SEG_PREFIX, strlen(SEG_PREFIX)) == 0 ||
            strcmp(name, CURSOR_TMP) == 0);
}

static int sync_dir(spool *sp) {
    if (sp->sync_every < 0) return 0;
    return fsync(sp->dir_fd);
}

static int sync_file(spool *sp, int fd) {
    if (sp->sync_every < 0) return 0;
    return fdatasync(fd);
}

static void report(spool *sp, const char *name, uint64_t off, const char *fmt,
                   ...) __attribute__((format(printf, 4, 5)));

static void report(spool *sp, const char *name, uint64_t off, const char *fmt,
                   ...) {
    char path[PATH_MAX];
    char reason[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    snprintf(path, sizeof(path), "%s/%s", sp->dir, name);
    if (sp->report) {
        sp->report(sp->report_ud, path, off, reason);
        return;
    }
    log_msg(NLOG_WARN, "Spool", "%s at offset %" PRIu64 ": %s", path, off,
            reason);
}

/* Renames name to name.corrupt (or .corrupt.N if taken). */
static void quarantine(spool *sp, const char *name, const char *why) {
    char target[SEG_NAME_MAX + 32];
    snprintf(target, sizeof(target), "%s.corrupt", name);
    for (int i = 1; i < 1000 && faccessat(sp->dir_fd, target, F_OK, 0) == 0;
         i++)
        snprintf(target, sizeof(target), "%s.corrupt.%d", name, i);

    if (renameat(sp->dir_fd, name, sp->dir_fd, target) != 0) {
        report(sp, name, 0,
               "%s; renaming it to %s failed (%s), so it was "
               "left in place",
               why, target, strerror(errno));
        return;
    }
    sp->st.quarantined++;
    sync_dir(sp);
    report(sp, name, 0, "%s; renamed to %s and left for inspection", why,
           target);
}

static int buf_reserve(spool *sp, size_t n) {
    if (n <= sp->buf_cap) return 0;
    size_t cap = sp->buf_cap ? sp->buf_cap : 4096;
    while (cap < n)
        cap *= 2;
    uint8_t *b = realloc(sp->buf, cap);
    if (!b) return -1;
    sp->buf = b;
    sp->buf_cap = cap;
    return 0;
}

/* ---- record framing ---- */

static void rec_encode(uint8_t *h, const rec_header *r) {
    memcpy(h, REC_MARKER, 4);
    put32(h + 4, r->len);
    put64(h + 8, r->seq);
    put16(h + 16, r->kind);
    put16(h + 18, 0);
    put32(h + 20, r->count);
    put32(h + 24, r->payload_crc);
    put32(h + 28, spool_crc32c(0, h, 28));
}

/* Decodes a header; false if its marker, checksum or fields are bad. */
static bool rec_decode(const uint8_t *h, rec_header *r) {
    if (memcmp(h, REC_MARKER, 4) != 0) return false;
    if (spool_crc32c(0, h, 28) != get32(h + 28)) return false;
    if (get16(h + 18) != 0) return false;
    r->len = get32(h + 4);
    r->seq = get64(h + 8);
    r->kind = get16(h + 16);
    r->count = get32(h + 20);
    r->payload_crc = get32(h + 24);
    return r->len <= SPOOL_RECORD_MAX && r->seq != 0 && r->seq < SEQ_LIMIT;
}

/* Is there a whole, valid record at off that follows last_seq? Leaves
 * its payload in sp->buf. -1 on a read error. */
static int rec_valid_at(spool *sp, seg_walk *w, uint64_t off, rec_header *r) {
    uint8_t h[REC_HEADER];
    if (w->end - off < REC_HEADER) return 0;
    ssize_t got = read_at(w->fd, h, REC_HEADER, off);
    if (got < 0) return -1;
    if (got < (ssize_t)REC_HEADER || !rec_decode(h, r)) return 0;
    if (r->len > w->end - off - REC_HEADER || r->seq <= w->last_seq) return 0;

    if (buf_reserve(sp, r->len ? r->len : 1) != 0) return -1;
    got = read_at(w->fd, sp->buf, r->len, off + REC_HEADER);
    if (got < 0) return -1;
    if ((size_t)got < r->len) return 0;
    return spool_crc32c(0, sp->buf, r->len) == r->payload_crc;
}

/* The offset of the next valid record after a damaged place at `from`,
 * or w->end if there is none. -1 on a read error. */
static int64_t resync(spool *sp, seg_walk *w, uint64_t from) {
    uint8_t chunk[RESYNC_CHUNK];
    uint64_t pos = from + 1;

    while (pos + REC_HEADER <= w->end) {
        size_t want = RESYNC_CHUNK;
        if (w->end - pos < want) want = (size_t)(w->end - pos);
        ssize_t got = read_at(w->fd, chunk, want, pos);
        if (got < 0) return -1;
        if (got < 4) break;

        for (size_t i = 0; i + 4 <= (size_t)got; i++) {
            const uint8_t *m =
                memchr(chunk + i, REC_MARKER[0], (size_t)got - 3 - i);
            if (!m) break;
            i = (size_t)(m - chunk);
            if (memcmp(m, REC_MARKER, 4) != 0) continue;
            rec_header r;
            int ok = rec_valid_at(sp, w, pos + i, &r);
            if (ok < 0) return -1;
            if (ok) return (int64_t)(pos + i);
        }
        pos += (uint64_t)got - 3;
    }
    return (int64_t)w->end;
}

static void note_damage(spool *sp, seg_walk *w, bool torn) {
    w->damaged = true;
    if (w->quiet) return;
    if (torn)
        sp->st.torn_tails++;
    else
        sp->st.corrupt_records++;
}

/* The next good record of a walk: 1 with *r filled and its payload in
 * sp->buf (w->off stays at its start), 0 at the end of the segment, -1 on
 * a read error or out of memory (message set). Damage on the way is
 * reported (unless quiet), counted and skipped. */
static int walk_next(spool *sp, seg_walk *w, rec_header *r) {
    char name[SEG_NAME_MAX];
    seg_name(name, sizeof(name), w->number, false);

    while (w->off < w->end) {
        uint64_t left = w->end - w->off;
        uint8_t h[REC_HEADER];
        w->quiet = w->off < w->quiet_below;

        if (left < REC_HEADER) {
            note_damage(sp, w, true);
            if (!w->quiet)
                report(sp, name, w->off,
                       "torn tail: the segment ends %" PRIu64
                       " bytes into a record header",
                       left);
            w->off = w->end;
            break;
        }

        ssize_t got = read_at(w->fd, h, REC_HEADER, w->off);
        if (got < 0) goto io_error;
        if (got < (ssize_t)REC_HEADER) {
            w->end = w->off + (uint64_t)got; /* shrank under us */
            continue;
        }

        if (rec_decode(h, r) && r->seq > w->last_seq) {
            if (r->len > left - REC_HEADER) {
                note_damage(sp, w, true);
                if (!w->quiet)
                    report(sp, name, w->off,
                           "torn tail: record %" PRIu64 " declares %" PRIu32
                           " payload bytes, only %" PRIu64 " follow",
                           r->seq, r->len, left - REC_HEADER);
                w->off = w->end;
                break;
            }
            if (buf_reserve(sp, r->len ? r->len : 1) != 0) {
                SP_ERR(sp,
                       "out of memory reading a %" PRIu32 "-byte spool record",
                       r->len);
                return -1;
            }
            got = read_at(w->fd, sp->buf, r->len, w->off + REC_HEADER);
            if (got < 0) goto io_error;
            if (got < (ssize_t)r->len) {
                w->end = w->off + REC_HEADER + (uint64_t)got;
                continue;
            }
            w->last_seq = r->seq;
            if (spool_crc32c(0, sp->buf, r->len) == r->payload_crc) return 1;
            note_damage(sp, w, false);
            if (!w->quiet)
                report(sp, name, w->off,
                       "record %" PRIu64 ": payload "
                       "checksum mismatch; record skipped",
                       r->seq);
            w->off += REC_HEADER + r->len;
            continue;
        }

        int64_t next = resync(sp, w, w->off);
        if (next < 0) goto io_error;
        note_damage(sp, w, false);
        if (!w->quiet) {
            if ((uint64_t)next < w->end)
                report(sp, name, w->off,
                       "bad record header (marker, "
                       "checksum or sequence); skipped %" PRIu64
                       " bytes to the next valid record",
                       (uint64_t)next - w->off);
            else
                report(sp, name, w->off,
                       "bad record header (marker, "
                       "checksum or sequence); no valid "
                       "record follows in this segment (%" PRIu64
                       " bytes lost)",
                       w->end - w->off);
        }
        w->off = (uint64_t)next;
    }
    return 0;

io_error:
    SP_ERR(sp, "cannot read spool segment %s/%s at offset %" PRIu64 ": %s",
           sp->dir, name, w->off, strerror(errno));
    return -1;
}

/* ---- segments ---- */

static int segs_push(spool *sp, const seg_info *s) {
    if (sp->nsegs == sp->cap) {
        size_t cap = sp->cap ? sp->cap * 2 : 16;
        seg_info *n = realloc(sp->segs, cap * sizeof(*n));
        if (!n) return -1;
        sp->segs = n;
        sp->cap = cap;
    }
    sp->segs[sp->nsegs++] = *s;
    sp->st.disk_bytes += s->size;
    sp->st.pending_records += s->pend_records;
    sp->st.pending_bytes += s->pend_bytes;
    sp->st.pending_count += s->pend_count;
    return 0;
}

static void close_reader(spool *sp) {
    if (sp->rd.fd >= 0) close(sp->rd.fd);
    sp->rd.fd = -1;
}

/* Forgets segs[0]: deletes its file, or quarantines it if damaged. */
static void segs_retire_head(spool *sp) {
    seg_info *s = &sp->segs[0];
    char name[SEG_NAME_MAX];
    seg_name(name, sizeof(name), s->number, false);

    if (sp->rd_idx == 0) {
        close_reader(sp);
        sp->rd = (seg_walk){.fd = -1, .off = SEG_HEADER};
    } else {
        sp->rd_idx--;
    }
    sp->head_off = SEG_HEADER;
    sp->head_last_seq = 0;
    if (sp->wfd >= 0 && sp->nsegs == 1) {
        close(sp->wfd);
        sp->wfd = -1;
        sp->unsynced = 0;
    }
    if (s->damaged)
        quarantine(sp, name, "segment held damaged records");
    else if (unlinkat(sp->dir_fd, name, 0) != 0 && errno != ENOENT)
        log_msg(NLOG_WARN, "Spool",
                "cannot delete delivered segment "
                "%s/%s: %s; delete it by hand",
                sp->dir, name, strerror(errno));

    sp->st.disk_bytes -= s->size;
    sp->st.pending_records -= s->pend_records;
    sp->st.pending_bytes -= s->pend_bytes;
    sp->st.pending_count -= s->pend_count;
    sp->nsegs--;
    memmove(sp->segs, sp->segs + 1, sp->nsegs * sizeof(*sp->segs));
}

/* Flushes and closes the segment being written, if any. */
static int close_writer(spool *sp) {
    int rc = 0;
    if (sp->wfd < 0) return 0;
    if (sp->unsynced && sync_file(sp, sp->wfd) != 0) rc = -1;
    close(sp->wfd);
    sp->wfd = -1;
    sp->unsynced = 0;
    return rc;
}

/* Creates a new segment (header written and synced under a .tmp name,
 * then renamed in) and makes it the one written. */
static int seg_create(spool *sp) {
    char tmp[SEG_NAME_MAX];
    char name[SEG_NAME_MAX];
    uint8_t h[SEG_HEADER] = {0};
    uint64_t number = sp->next_number;
    seg_name(tmp, sizeof(tmp), number, true);
    seg_name(name, sizeof(name), number, false);

    memcpy(h, SEG_MAGIC, 8);
    put32(h + 8, SEG_VERSION);
    put32(h + 12, SEG_HEADER);
    put64(h + 16, sp->st.next_seq);
    put32(h + 28, spool_crc32c(0, h, 28));

    int fd =
        openat(sp->dir_fd, tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) goto fail;
    if (write_at(fd, h, SEG_HEADER, NULL, 0, 0) != 0 || sync_file(sp, fd) != 0)
        goto fail_fd;
    if (renameat(sp->dir_fd, tmp, sp->dir_fd, name) != 0) goto fail_fd;
    sync_dir(sp);

    seg_info s = {
        .number = number, .size = SEG_HEADER, .walked_to = SEG_HEADER};
    if (segs_push(sp, &s) != 0) {
        close(fd);
        unlinkat(sp->dir_fd, name, 0);
        SP_ERR(sp, "out of memory adding a spool segment");
        return -1;
    }
    sp->next_number++;
    sp->wfd = fd;
    sp->unsynced = 0;
    return 0;

fail_fd:
    close(fd);
    unlinkat(sp->dir_fd, tmp, 0);
fail:
    SP_ERR(sp,
           "cannot create spool segment %s/%s: %s; check free space "
           "and permissions there",
           sp->dir, name, strerror(errno));
    return -1;
}

/* ---- cursor ---- */

static int cursor_write(spool *sp, uint64_t acked) {
    uint8_t c[CUR_SIZE] = {0};
    memcpy(c, CUR_MAGIC, 8);
    put32(c + 8, CUR_VERSION);
    put64(c + 16, acked);
    put32(c + 28, spool_crc32c(0, c, 28));

    int fd = openat(sp->dir_fd, CURSOR_TMP,
                    O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) goto fail;
    if (write_at(fd, c, CUR_SIZE, NULL, 0, 0) != 0 || sync_file(sp, fd) != 0) {
        close(fd);
        goto fail;
    }
    close(fd);
    if (renameat(sp->dir_fd, CURSOR_TMP, sp->dir_fd, CURSOR_NAME) != 0)
        goto fail;
    sync_dir(sp);
    return 0;

fail:
    SP_ERR(sp,
           "cannot write spool cursor %s/" CURSOR_NAME ": %s; the "
           "record stays pending",
           sp->dir, strerror(errno));
    unlinkat(sp->dir_fd, CURSOR_TMP, 0);
    return -1;
}

/* Reads the cursor; a missing one means nothing was delivered, a damaged
 * one is quarantined (everything left is replayed). */
static int cursor_read(spool *sp, char *err, size_t err_size) {
    uint8_t c[CUR_SIZE + 1];
    int fd = openat(sp->dir_fd, CURSOR_NAME, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) return 0;
    if (fd < 0) {
        set_err(err, err_size,
                "cannot open spool cursor %s/" CURSOR_NAME ": %s", sp->dir,
                strerror(errno));
        return -1;
    }
    ssize_t got = read_at(fd, c, sizeof(c), 0);
    close(fd);
    if (got < 0) {
        set_err(err, err_size,
                "cannot read spool cursor %s/" CURSOR_NAME ": %s", sp->dir,
                strerror(errno));
        return -1;
    }
    if (got != CUR_SIZE || memcmp(c, CUR_MAGIC, 8) != 0 ||
        get32(c + 8) != CUR_VERSION ||
        spool_crc32c(0, c, 28) != get32(c + 28)) {
        quarantine(sp, CURSOR_NAME,
                   "damaged cursor; every record on disk "
                   "will be replayed");
        return 0;
    }
    sp->st.acked_seq = get64(c + 16);
    if (sp->st.acked_seq >= SEQ_LIMIT) {
        sp->st.acked_seq = 0;
        quarantine(sp, CURSOR_NAME,
                   "cursor holds an impossible sequence "
                   "number; every record on disk will be replayed");
    }
    return 0;
}

/* ---- open ---- */

static int check_dir(const char *dir, char *err, size_t err_size) {
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (errno == ENOENT)
            set_err(err, err_size,
                    "spool directory %s does not exist: "
                    "create it (mkdir -p %s) or set NETRA_SPOOL_DIR to a "
                    "directory netra can write",
                    dir, dir);
        else if (errno == EACCES)
            set_err(err, err_size,
                    "spool directory %s cannot be reached by this user "
                    "(uid %d): fix the permissions of its parent "
                    "directories",
                    dir, (int)geteuid());
        else
            set_err(err, err_size,
                    "cannot reach spool directory %s: %s; "
                    "set NETRA_SPOOL_DIR to a directory netra can write",
                    dir, strerror(errno));
        return SPOOL_EIO;
    }
    if (!S_ISDIR(st.st_mode)) {
        set_err(err, err_size,
                "spool directory %s is not a directory: "
                "set NETRA_SPOOL_DIR to a directory",
                dir);
        return SPOOL_EIO;
    }
    if (access(dir, W_OK | X_OK) != 0) {
        set_err(err, err_size,
                "spool directory %s is not writable by "
                "this user (uid %d): fix its permissions or set "
                "NETRA_SPOOL_DIR elsewhere",
                dir, (int)geteuid());
        return SPOOL_EIO;
    }
    return SPOOL_OK;
}

static int take_lock(spool *sp, char *err, size_t err_size) {
    sp->lock_fd =
        openat(sp->dir_fd, LOCK_NAME, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (sp->lock_fd < 0) {
        set_err(err, err_size,
                "cannot open spool lock %s/" LOCK_NAME
                ": %s; fix the directory's permissions",
                sp->dir, strerror(errno));
        return SPOOL_EIO;
    }

    if (flock(sp->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char pid[32] = "";
        ssize_t n = read_at(sp->lock_fd, pid, sizeof(pid) - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EWOULDBLOCK) {
            set_err(err, err_size,
                    "spool directory %s is in use by "
                    "another process (pid %s, per %s/" LOCK_NAME "): stop "
                    "that netra instance or give this one its own "
                    "NETRA_SPOOL_DIR",
                    sp->dir, pid[0] ? pid : "unknown", sp->dir);
            return SPOOL_ELOCKED;
        }
        set_err(err, err_size, "cannot lock %s/" LOCK_NAME ": %s", sp->dir,
                strerror(e));
        return SPOOL_EIO;
    }

    char pid[32];
    int n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    if (ftruncate(sp->lock_fd, 0) != 0 ||
        write_at(sp->lock_fd, pid, (size_t)n, NULL, 0, 0) != 0) {
        set_err(err, err_size, "cannot write %s/" LOCK_NAME ": %s", sp->dir,
                strerror(errno));
        return SPOOL_EIO;
    }
    return SPOOL_OK;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Lists the segment numbers, oldest first, removing *.tmp leftovers. */
static int list_segments(spool *sp, uint64_t **out, size_t *count, char *err,
                         size_t err_size) {
    int fd = dup(sp->dir_fd);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (!d) {
        if (fd >= 0) close(fd);
        set_err(err, err_size, "cannot list spool directory %s: %s", sp->dir,
                strerror(errno));
        return SPOOL_EIO;
    }

    uint64_t *nums = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        uint64_t num;
        if (is_tmp_name(e->d_name)) {
            unlinkat(sp->dir_fd, e->d_name, 0);
            continue;
        }
        if (!seg_parse_name(e->d_name, &num)) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            uint64_t *m = realloc(nums, cap * sizeof(*m));
            if (!m) {
                free(nums);
                closedir(d);
                set_err(err, err_size, "out of memory listing %s", sp->dir);
                return SPOOL_ENOMEM;
            }
            nums = m;
        }
        nums[n++] = num;
    }
    closedir(d);
    if (n) qsort(nums, n, sizeof(*nums), cmp_u64);
    *out = nums;
    *count = n;
    return SPOOL_OK;
}

/* Checks one segment found on open: counts what is pending, reports
 * damage; keeps it, or deletes (quarantines) it when nothing is
 * pending. */
static int scan_segment(spool *sp, uint64_t number, char *err,
                        size_t err_size) {
    char name[SEG_NAME_MAX];
    seg_name(name, sizeof(name), number, false);
    int fd = openat(sp->dir_fd, name, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        set_err(err, err_size, "cannot open spool segment %s/%s: %s", sp->dir,
                name, strerror(errno));
        if (fd >= 0) close(fd);
        return SPOOL_EIO;
    }

    uint8_t h[SEG_HEADER];
    ssize_t got = read_at(fd, h, SEG_HEADER, 0);
    const char *bad = NULL;
    if (got < 0)
        bad = "unreadable segment header";
    else if (got < (ssize_t)SEG_HEADER)
        bad = "segment shorter than its header";
    else if (memcmp(h, SEG_MAGIC, 8) != 0)
        bad = "bad segment magic";
    else if (spool_crc32c(0, h, 28) != get32(h + 28))
        bad = "segment header checksum mismatch";
    else if (get32(h + 8) != SEG_VERSION || get32(h + 12) != SEG_HEADER)
        bad = "unsupported segment format version (this netra reads 1)";
    else if (get64(h + 16) >= SEQ_LIMIT)
        bad = "segment header holds an impossible sequence number";
    if (bad) {
        close(fd);
        quarantine(sp, name, bad);
        return SPOOL_OK;
    }

    uint64_t base = get64(h + 16);
    if (base > sp->st.next_seq) sp->st.next_seq = base;

    seg_info s = {.number = number,
                  .size = (uint64_t)st.st_size,
                  .walked_to = (uint64_t)st.st_size};
    seg_walk w = {.fd = fd, .number = number, .end = s.size, .off = SEG_HEADER};
    rec_header r;
    int rc;
    while ((rc = walk_next(sp, &w, &r)) == 1) {
        if (r.seq >= sp->st.next_seq) sp->st.next_seq = r.seq + 1;
        if (r.seq > sp->st.acked_seq) {
            s.pend_records++;
            s.pend_bytes += REC_HEADER + r.len;
            s.pend_count += r.count;
        }
        w.off += REC_HEADER + r.len;
    }
    close(fd);
    if (rc < 0) {
        set_err(err, err_size, "%s", sp->err);
        return SPOOL_EIO;
    }
    s.damaged = w.damaged;

    if (s.pend_records == 0) {
        if (s.damaged)
            quarantine(sp, name, "segment held damaged records");
        else
            unlinkat(sp->dir_fd, name, 0);
        return SPOOL_OK;
    }
    if (segs_push(sp, &s) != 0) {
        set_err(err, err_size, "out of memory opening the spool");
        return SPOOL_ENOMEM;
    }
    return SPOOL_OK;
}

static int load(spool *sp, char *err, size_t err_size) {
    uint64_t *nums = NULL;
    size_t n = 0;
    int rc = list_segments(sp, &nums, &n, err, err_size);
    if (rc != SPOOL_OK) return rc;

    rc = cursor_read(sp, err, err_size) == 0 ? SPOOL_OK : SPOOL_EIO;
    sp->st.next_seq = sp->st.acked_seq + 1;
    for (size_t i = 0; rc == SPOOL_OK && i < n; i++)
        rc = scan_segment(sp, nums[i], err, err_size);
    sp->next_number = n ? nums[n - 1] + 1 : 1;
    free(nums);
    return rc;
}

int spool_open(const spool_options *opt, spool **out, char *err,
               size_t err_size) {
    *out = NULL;
    if (!opt || !opt->dir || !opt->dir[0]) {
        set_err(err, err_size,
                "spool_open: no directory given; set "
                "NETRA_SPOOL_DIR");
        return SPOOL_EINVAL;
    }
    int rc = check_dir(opt->dir, err, err_size);
    if (rc != SPOOL_OK) return rc;

    spool *sp = calloc(1, sizeof(*sp));
    if (!sp || !(sp->dir = strdup(opt->dir))) {
        free(sp);
        set_err(err, err_size, "out of memory opening the spool");
        return SPOOL_ENOMEM;
    }
    sp->lock_fd = sp->wfd = sp->rd.fd = -1;
    sp->rd.off = sp->head_off = SEG_HEADER;
    sp->max_bytes = opt->max_bytes ? opt->max_bytes : SPOOL_DEFAULT_MAX_BYTES;
    sp->segment_bytes =
        opt->segment_bytes ? opt->segment_bytes : SPOOL_DEFAULT_SEGMENT_BYTES;
    if (sp->segment_bytes < MIN_SEGMENT_BYTES)
        sp->segment_bytes = MIN_SEGMENT_BYTES;
    sp->sync_every = opt->sync_every == 0 ? 1 : opt->sync_every;
    sp->report = opt->report;
    sp->report_ud = opt->report_ud;
    sp->st.max_bytes = sp->max_bytes;

    sp->dir_fd = open(sp->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sp->dir_fd < 0) {
        set_err(err, err_size, "cannot open spool directory %s: %s", sp->dir,
                strerror(errno));
        rc = SPOOL_EIO;
    } else {
        rc = take_lock(sp, err, err_size);
    }
    if (rc == SPOOL_OK) rc = load(sp, err, err_size);
    if (rc != SPOOL_OK) {
        spool_close(sp);
        return rc;
    }
    *out = sp;
    return SPOOL_OK;
}

void spool_close(spool *sp) {
    if (!sp) return;
    if (close_writer(sp) != 0)
        log_msg(NLOG_WARN, "Spool",
                "syncing the last segment in %s failed "
                "on close: %s",
                sp->dir, strerror(errno));
    close_reader(sp);
    if (sp->lock_fd >= 0) close(sp->lock_fd); /* releases the flock */
    if (sp->dir_fd >= 0) close(sp->dir_fd);
    free(sp->segs);
    free(sp->out);
    free(sp->buf);
    free(sp->dir);
    free(sp);
}

/* ---- append ---- */

/* Undoes a failed append at `off` in the segment being written; if that
 * fails too, stops writing there (the next append starts a segment). */
static void append_rollback(spool *sp, uint64_t off) {
    int e = errno;
    if (ftruncate(sp->wfd, (off_t)off) != 0) {
        close(sp->wfd);
        sp->wfd = -1;
        sp->unsynced = 0;
    }
    errno = e;
}

int spool_append(spool *sp, uint16_t kind, const void *data, size_t len,
                 uint32_t count, uint64_t *seq) {
    if (!sp || (len && !data)) return SPOOL_EINVAL;
    if (len > SPOOL_RECORD_MAX) {
        SP_ERR(sp,
               "spool record of %zu bytes is over the %u-byte limit; "
               "send smaller batches",
               len, SPOOL_RECORD_MAX);
        return SPOOL_ETOOBIG;
    }

    uint64_t frame = REC_HEADER + (uint64_t)len;
    seg_info *cur = sp->wfd >= 0 ? &sp->segs[sp->nsegs - 1] : NULL;
    bool roll = !cur || (cur->size > SEG_HEADER &&
                         cur->size + frame > sp->segment_bytes);
    uint64_t need = frame + (roll ? SEG_HEADER : 0);
    if (sp->st.disk_bytes + need > sp->max_bytes) {
        sp->st.refused_records++;
        sp->st.refused_count += count;
        SP_ERR(sp,
               "spool %s is full (%" PRIu64 " of %" PRIu64 " bytes); "
               "batch of %" PRIu32 " refused; raise NETRA_SPOOL_MAX_BYTES "
               "or bring ClickHouse back",
               sp->dir, sp->st.disk_bytes, sp->max_bytes, count);
        return SPOOL_FULL;
    }

    if (roll) {
        if (close_writer(sp) != 0) {
            SP_ERR(sp, "cannot sync spool segment in %s: %s", sp->dir,
                   strerror(errno));
            return SPOOL_EIO;
        }
        if (seg_create(sp) != 0) return SPOOL_EIO;
        cur = &sp->segs[sp->nsegs - 1];
    }

    rec_header r = {.len = (uint32_t)len,
                    .seq = sp->st.next_seq,
                    .kind = kind,
                    .count = count,
                    .payload_crc = spool_crc32c(0, data, len)};
    uint8_t h[REC_HEADER];
    rec_encode(h, &r);
    bool sync = sp->sync_every > 0 && sp->unsynced + 1 >= sp->sync_every;
    if (write_at(sp->wfd, h, REC_HEADER, data, len, cur->size) != 0 ||
        (sync && fdatasync(sp->wfd) != 0)) {
        SP_ERR(sp,
               "cannot write to spool segment in %s: %s; check free "
               "space",
               sp->dir, strerror(errno));
        append_rollback(sp, cur->size);
        return SPOOL_EIO;
    }

    sp->unsynced = sync ? 0 : sp->unsynced + 1;
    cur->size += frame;
    cur->pend_records++;
    cur->pend_bytes += frame;
    cur->pend_count += count;
    sp->st.disk_bytes += frame;
    sp->st.pending_records++;
    sp->st.pending_bytes += frame;
    sp->st.pending_count += count;
    if (seq) *seq = r.seq;
    sp->st.next_seq++;
    return SPOOL_OK;
}

int spool_sync(spool *sp) {
    if (!sp) return SPOOL_EINVAL;
    if (sp->wfd < 0 || !sp->unsynced) return SPOOL_OK;
    if (fdatasync(sp->wfd) != 0) {
        SP_ERR(sp, "cannot sync spool segment in %s: %s", sp->dir,
               strerror(errno));
        return SPOOL_EIO;
    }
    sp->unsynced = 0;
    return SPOOL_OK;
}

/* ---- replay ---- */

static handed *out_front(spool *sp) {
    return sp->out_len ? &sp->out[sp->out_start] : NULL;
}

static int out_push(spool *sp, const handed *h) {
    if (sp->out_start > 0 && sp->out_start + sp->out_len == sp->out_cap) {
        memmove(sp->out, sp->out + sp->out_start,
                sp->out_len * sizeof(*sp->out));
        sp->out_start = 0;
    }
    if (sp->out_start + sp->out_len == sp->out_cap) {
        size_t cap = sp->out_cap ? sp->out_cap * 2 : 64;
        handed *n = realloc(sp->out, cap * sizeof(*n));
        if (!n) return -1;
        sp->out = n;
        sp->out_cap = cap;
    }
    sp->out[sp->out_start + sp->out_len++] = *h;
    return 0;
}

/* Moves the reader back to the head: everything handed out and not
 * acknowledged will be handed out again. */
static void reader_rewind(spool *sp) {
    close_reader(sp);
    sp->rd_idx = 0;
    sp->rd = (seg_walk){
        .fd = -1, .off = sp->head_off, .last_seq = sp->head_last_seq};
    sp->out_start = sp->out_len = 0;
    sp->last_valid = false;
}

static bool is_writing(const spool *sp, size_t idx) {
    return sp->wfd >= 0 && idx == sp->nsegs - 1;
}

/* The reader's next pending record: 1 (payload in sp->buf), 0 when it
 * has reached the end of what is written, -1 on an error. */
static int reader_next(spool *sp, rec_header *r) {
    while (sp->rd_idx < sp->nsegs) {
        seg_info *s = &sp->segs[sp->rd_idx];
        if (sp->rd.fd < 0) {
            char name[SEG_NAME_MAX];
            seg_name(name, sizeof(name), s->number, false);
            sp->rd.fd = openat(sp->dir_fd, name, O_RDONLY | O_CLOEXEC);
            if (sp->rd.fd < 0) {
                SP_ERR(sp, "cannot open spool segment %s/%s: %s", sp->dir, name,
                       strerror(errno));
                return -1;
            }
            sp->rd.number = s->number;
        }
        sp->rd.end = s->size;
        sp->rd.quiet_below = s->walked_to;
        sp->rd.damaged = false;

        int rc = walk_next(sp, &sp->rd, r);
        if (sp->rd.damaged) s->damaged = true;
        if (rc < 0) return -1;
        if (rc == 1) sp->rd.off += REC_HEADER + r->len;
        if (sp->rd.off > s->walked_to) s->walked_to = sp->rd.off;
        if (rc == 1 && r->seq > sp->st.acked_seq) return 1;
        if (rc == 1) continue;

        if (is_writing(sp, sp->rd_idx)) return 0;
        close_reader(sp);
        sp->rd_idx++;
        sp->rd = (seg_walk){.fd = -1, .off = SEG_HEADER};
    }
    return 0;
}

/* Forgets the segments before the oldest one still needed: the one of
 * the oldest record handed out, else the reader's. A drained segment
 * that is being written goes too (the next append starts another). */
static void retire_consumed(spool *sp) {
    handed *f = out_front(sp);
    uint64_t keep = f                        ? f->number
                    : sp->rd_idx < sp->nsegs ? sp->segs[sp->rd_idx].number
                                             : UINT64_MAX;
    while (sp->nsegs > 0 && sp->segs[0].number < keep)
        segs_retire_head(sp);

    if (!f && sp->nsegs == 1 && sp->rd_idx == 0 && is_writing(sp, 0) &&
        sp->segs[0].size > SEG_HEADER && sp->rd.off == sp->segs[0].size)
        segs_retire_head(sp);
}

static void fill_record(const spool *sp, spool_record *out) {
    out->seq = sp->last.seq;
    out->kind = sp->last.kind;
    out->count = sp->last.count;
    out->data = sp->buf;
    out->len = sp->last.len;
}

int spool_peek_next(spool *sp, uint64_t after, spool_record *out) {
    if (!sp || !out) return SPOOL_EINVAL;
    handed *f = out_front(sp);
    if (f && after < sp->last.seq) {
        uint64_t prev =
            sp->out_len > 1 ? sp->out[sp->out_start + sp->out_len - 2].seq : 0;
        if (sp->last_valid && after >= prev) {
            fill_record(sp, out); /* the newest one, asked again */
            return SPOOL_OK;
        }
        reader_rewind(sp);
    }

    for (;;) {
        rec_header r;
        int rc = reader_next(sp, &r);
        if (rc < 0) {
            reader_rewind(sp);
            return SPOOL_EIO;
        }
        if (rc == 0) {
            retire_consumed(sp);
            return SPOOL_EMPTY;
        }
        handed h = {.seq = r.seq,
                    .number = sp->segs[sp->rd_idx].number,
                    .end = sp->rd.off,
                    .len = r.len,
                    .count = r.count};
        if (out_push(sp, &h) != 0) {
            reader_rewind(sp);
            SP_ERR(sp, "out of memory replaying the spool");
            return SPOOL_ENOMEM;
        }
        sp->last = r;
        sp->last_valid = true;
        if (r.seq > after) {
            fill_record(sp, out);
            return SPOOL_OK;
        }
    }
}

int spool_peek(spool *sp, spool_record *out) {
    return spool_peek_next(sp, 0, out);
}

int spool_ack_through(spool *sp, uint64_t seq) {
    if (!sp) return SPOOL_EINVAL;
    if (seq <= sp->st.acked_seq) return SPOOL_OK;
    if (!out_front(sp) || seq > sp->last.seq) {
        SP_ERR(sp,
               "spool_ack_through(%" PRIu64 "): that record was not "
               "handed out yet (the newest is %" PRIu64 "); call "
               "spool_peek_next first",
               seq, out_front(sp) ? sp->last.seq : 0);
        return SPOOL_EINVAL;
    }
    if (cursor_write(sp, seq) != 0) return SPOOL_EIO;
    sp->st.acked_seq = seq;

    handed *h;
    while ((h = out_front(sp)) != NULL && h->seq <= seq) {
        while (sp->segs[0].number < h->number)
            segs_retire_head(sp);
        seg_info *s = &sp->segs[0];
        uint64_t frame = REC_HEADER + h->len;
        s->pend_records--;
        s->pend_bytes -= frame;
        s->pend_count -= h->count;
        sp->st.pending_records--;
        sp->st.pending_bytes -= frame;
        sp->st.pending_count -= h->count;
        sp->head_off = h->end;
        sp->head_last_seq = h->seq;
        sp->out_start++;
        sp->out_len--;
    }
    if (!sp->out_len) {
        sp->out_start = 0;
        retire_consumed(sp);
    }
    return SPOOL_OK;
}

int spool_ack(spool *sp, uint64_t seq) {
    if (!sp) return SPOOL_EINVAL;
    handed *f = out_front(sp);
    if (!f || seq != f->seq) {
        if (f)
            SP_ERR(sp,
                   "spool_ack(%" PRIu64 "): the oldest record handed "
                   "out is %" PRIu64 "; acknowledge that one",
                   seq, f->seq);
        else
            SP_ERR(sp,
                   "spool_ack(%" PRIu64 "): no record is handed out; "
                   "call spool_peek first",
                   seq);
        return SPOOL_EINVAL;
    }
    return spool_ack_through(sp, seq);
}

/* ---- small accessors ---- */

void spool_get_stats(const spool *sp, spool_stats *out) {
    *out = sp->st;
    out->segments = (uint32_t)sp->nsegs;
}

const char *spool_error(const spool *sp) {
    return sp ? sp->err : "no spool";
}

const char *spool_result_name(int code) {
    switch (code) {
    case SPOOL_OK:
        return "ok";
    case SPOOL_EMPTY:
        return "empty";
    case SPOOL_FULL:
        return "full";
    case SPOOL_ELOCKED:
        return "locked";
    case SPOOL_EIO:
        return "io error";
    case SPOOL_EINVAL:
        return "invalid argument";
    case SPOOL_ETOOBIG:
        return "record too big";
    case SPOOL_ENOMEM:
        return "out of memory";
    default:
        return "unknown";
    }
}
