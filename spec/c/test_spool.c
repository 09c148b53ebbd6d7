/* Unit tests for spool: order across segment rolls, reopen, the bound,
 * the lock, damage (payload, header, torn tail, segment header) and
 * crash safety under SIGKILL, all on real files in a scratch directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "spool.h"

/* ---- scratch directories and reports ---- */

static char reports[16384];
static int nreports;

static void on_report(void *ud, const char *path, uint64_t offset,
                      const char *reason) {
    (void)ud;
    size_t used = strlen(reports);
    snprintf(reports + used, sizeof(reports) - used, "%s@%llu: %s\n", path,
             (unsigned long long)offset, reason);
    nreports++;
}

static void make_dir(char *out, size_t n) {
    const char *base = getenv("NETRA_TEST_DIR");
    if (base) mkdir(base, 0755);
    snprintf(out, n, "%s/spool.XXXXXX", base ? base : "/tmp");
    assert_non_null(mkdtemp(out));
    reports[0] = '\0';
    nreports = 0;
}

static int rm_one(const char *p, const struct stat *s, int f, struct FTW *w) {
    (void)s;
    (void)f;
    (void)w;
    return remove(p);
}

static void remove_dir(const char *dir) {
    nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static spool *open_sync(const char *dir, uint64_t seg_bytes, uint64_t max_bytes,
                        int sync_every) {
    spool_options o = {.dir = dir,
                       .segment_bytes = seg_bytes,
                       .max_bytes = max_bytes,
                       .sync_every = sync_every,
                       .report = on_report};
    spool *sp = NULL;
    char err[512];
    int rc = spool_open(&o, &sp, err, sizeof(err));
    if (rc != SPOOL_OK) fail_msg("spool_open: %s", err);
    return sp;
}

static spool *open_ok(const char *dir, uint64_t seg_bytes, uint64_t max_bytes) {
    return open_sync(dir, seg_bytes, max_bytes, 0);
}

/* The payload of record `seq` in these tests: its length and bytes
 * follow from seq, so a replayed record can be checked alone. */
static size_t payload(uint64_t seq, uint8_t *buf) {
    size_t len = (size_t)((seq * 7919) % 3000);
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(seq * 31 + i);
    return len;
}

static bool payload_ok(const spool_record *r) {
    static uint8_t want[4096];
    size_t len = payload(r->seq, want);
    return r->len == len && memcmp(r->data, want, len) == 0 &&
           r->kind == (uint16_t)(r->seq % 3 + 1) &&
           r->count == (uint32_t)(r->seq % 100);
}

static uint64_t append_one(spool *sp) {
    static uint8_t buf[4096];
    spool_stats st;
    spool_get_stats(sp, &st);
    uint64_t want = st.next_seq;
    size_t len = payload(want, buf);
    uint64_t seq = 0;
    int rc = spool_append(sp, (uint16_t)(want % 3 + 1), buf, len,
                          (uint32_t)(want % 100), &seq);
    if (rc != SPOOL_OK) fail_msg("append: %s", spool_error(sp));
    assert_int_equal(seq, want);
    return seq;
}

/* Peeks and acks everything; returns how many, checking that sequences
 * only go up and payloads are right. Fills seen (if given). */
static int drain(spool *sp, uint64_t *seen, int max) {
    int n = 0;
    uint64_t last = 0;
    spool_record r;
    int rc;
    while ((rc = spool_peek(sp, &r)) == SPOOL_OK) {
        assert_true(r.seq > last);
        assert_true(payload_ok(&r));
        last = r.seq;
        if (seen && n < max) seen[n] = r.seq;
        n++;
        assert_int_equal(spool_ack(sp, r.seq), SPOOL_OK);
    }
    assert_int_equal(rc, SPOOL_EMPTY);
    return n;
}

/* Segment files in dir, oldest first (names into out[i], up to max). */
static int list_segs(const char *dir, char out[][300], int max) {
    struct dirent **ents;
    int n = scandir(dir, &ents, NULL, alphasort), k = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = ents[i]->d_name;
        size_t l = strlen(nm);
        if (!strncmp(nm, "seg-", 4) && l > 6 && !strcmp(nm + l - 6, ".spool") &&
            k < max)
            snprintf(out[k++], 300, "%s/%s", dir, nm);
        free(ents[i]);
    }
    free(ents);
    return k;
}

static int count_suffix(const char *dir, const char *suffix) {
    struct dirent **ents;
    int n = scandir(dir, &ents, NULL, alphasort), k = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = ents[i]->d_name;
        size_t l = strlen(nm), s = strlen(suffix);
        if (l >= s && !strcmp(nm + l - s, suffix)) k++;
        free(ents[i]);
    }
    free(ents);
    return k;
}

/* Offset of the idx-th record (0-based) in a segment file. */
static long record_offset(const char *path, int idx) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    long off = 32;
    for (int i = 0; i < idx; i++) {
        unsigned char h[8];
        fseek(f, off, SEEK_SET);
        assert_int_equal(fread(h, 1, 8, f), 8);
        uint32_t len = (uint32_t)h[4] | (uint32_t)h[5] << 8 |
                       (uint32_t)h[6] << 16 | (uint32_t)h[7] << 24;
        off += 32 + (long)len;
    }
    fclose(f);
    return off;
}

static void flip_byte(const char *path, long off) {
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    unsigned char b;
    assert_int_equal(pread(fd, &b, 1, off), 1);
    b ^= 0x5a;
    assert_int_equal(pwrite(fd, &b, 1, off), 1);
    close(fd);
}

/* ---- tests ---- */

static void test_crc32c(void **state) {
    (void)state;
    assert_int_equal(spool_crc32c(0, "123456789", 9), 0xE3069283u);
    uint32_t part = spool_crc32c(0, "1234", 4);
    assert_int_equal(spool_crc32c(part, "56789", 5), 0xE3069283u);
}

static void test_order_across_rolls(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 8192, 0);

    uint64_t want_bytes = 0, want_count = 0;
    for (int i = 0; i < 300; i++) {
        uint64_t seq = append_one(sp);
        assert_int_equal(seq, (uint64_t)i + 1);
        uint8_t tmp[4096];
        want_bytes += 32 + payload(seq, tmp);
        want_count += seq % 100;
    }
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.pending_records, 300);
    assert_int_equal(st.pending_bytes, want_bytes);
    assert_int_equal(st.pending_count, want_count);
    assert_true(st.segments > 20);
    char segs[64][300];
    assert_true(list_segs(dir, segs, 64) > 20);

    spool_record a, b;
    assert_int_equal(spool_peek(sp, &a), SPOOL_OK);
    assert_int_equal(spool_peek(sp, &b), SPOOL_OK);
    assert_int_equal(a.seq, 1);
    assert_int_equal(b.seq, 1); /* the same until acknowledged */

    uint64_t seen[300];
    assert_int_equal(drain(sp, seen, 300), 300);
    for (int i = 0; i < 300; i++)
        assert_int_equal(seen[i], (uint64_t)i + 1);

    spool_get_stats(sp, &st);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.pending_count, 0);
    assert_int_equal(st.disk_bytes, 0);
    assert_int_equal(st.acked_seq, 300);
    assert_int_equal(list_segs(dir, segs, 64), 0); /* all deleted */
    assert_int_equal(nreports, 0);

    assert_int_equal(append_one(sp), 301); /* sequence goes on */
    spool_close(sp);
    remove_dir(dir);
}

static void test_reopen_resumes(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 16384, 0);
    for (int i = 0; i < 50; i++)
        append_one(sp);
    spool_record r;
    for (int i = 0; i < 20; i++) {
        assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
        assert_int_equal(spool_ack(sp, r.seq), SPOOL_OK);
    }
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK); /* handed out, */
    assert_int_equal(r.seq, 21);                    /* not acked */
    spool_close(sp);

    sp = open_ok(dir, 16384, 0);
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.pending_records, 30);
    assert_int_equal(st.acked_seq, 20);
    assert_int_equal(st.next_seq, 51);
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
    assert_int_equal(r.seq, 21); /* handed out again: at least once */
    assert_true(payload_ok(&r));
    assert_int_equal(append_one(sp), 51);
    spool_close(sp);

    sp = open_ok(dir, 16384, 0);
    uint64_t seen[64];
    assert_int_equal(drain(sp, seen, 64), 31);
    assert_int_equal(seen[0], 21);
    assert_int_equal(seen[30], 51);
    spool_close(sp);

    sp = open_ok(dir, 16384, 0); /* drained: nothing comes back */
    assert_int_equal(spool_peek(sp, &r), SPOOL_EMPTY);
    spool_get_stats(sp, &st);
    assert_int_equal(st.next_seq, 52);
    assert_int_equal(nreports, 0);
    spool_close(sp);
    remove_dir(dir);
}

static void test_read_ahead(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 8192, 0);
    for (int i = 0; i < 100; i++)
        append_one(sp);

    spool_record r;
    uint64_t last = 0;
    for (int i = 0; i < 30; i++) { /* across several segments */
        assert_int_equal(spool_peek_next(sp, last, &r), SPOOL_OK);
        assert_int_equal(r.seq, last + 1);
        assert_true(payload_ok(&r));
        last = r.seq;
    }
    assert_int_equal(spool_peek_next(sp, 30, &r), SPOOL_OK);
    assert_int_equal(r.seq, 31); /* going on is fine */
    assert_int_equal(spool_peek_next(sp, 30, &r), SPOOL_OK);
    assert_int_equal(r.seq, 31); /* the same again */
    assert_int_equal(spool_peek_next(sp, 5, &r), SPOOL_OK);
    assert_int_equal(r.seq, 6); /* back again */
    assert_true(payload_ok(&r));
    assert_int_equal(spool_ack_through(sp, 30), SPOOL_EINVAL);
    assert_non_null(strstr(spool_error(sp), "newest is 6"));
    for (last = 6; last < 30; last = r.seq)
        assert_int_equal(spool_peek_next(sp, last, &r), SPOOL_OK);

    assert_int_equal(spool_ack_through(sp, 20), SPOOL_OK);
    assert_int_equal(spool_ack_through(sp, 12), SPOOL_OK); /* no-op */
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.pending_records, 80);
    assert_int_equal(st.acked_seq, 20);
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
    assert_int_equal(r.seq, 21);
    spool_close(sp); /* 21..30 handed out, not acknowledged */

    sp = open_ok(dir, 8192, 0);
    uint64_t want = 21;
    last = 0;
    for (;;) { /* batches of seven */
        int k = 0;
        while (k < 7 && spool_peek_next(sp, last, &r) == SPOOL_OK) {
            assert_int_equal(r.seq, want++);
            assert_true(payload_ok(&r));
            last = r.seq;
            k++;
        }
        if (!k) break;
        assert_int_equal(spool_ack_through(sp, last), SPOOL_OK);
    }
    assert_int_equal(want, 101);
    spool_get_stats(sp, &st);
    assert_int_equal(st.pending_records, 0);
    assert_int_equal(st.pending_bytes, 0);
    assert_int_equal(st.disk_bytes, 0);
    char segs[64][300];
    assert_int_equal(list_segs(dir, segs, 64), 0);
    assert_int_equal(nreports, 0);
    spool_close(sp);
    remove_dir(dir);
}

static void test_ack_rules(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 0, 0);
    spool_record r;
    assert_int_equal(spool_peek(sp, &r), SPOOL_EMPTY);
    append_one(sp);
    append_one(sp);
    assert_int_equal(spool_ack(sp, 1), SPOOL_EINVAL); /* nothing peeked */
    assert_non_null(strstr(spool_error(sp), "spool_peek"));
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
    assert_int_equal(spool_ack(sp, 2), SPOOL_EINVAL);
    assert_non_null(strstr(spool_error(sp), "handed out is 1"));
    assert_int_equal(spool_ack_through(sp, 2), SPOOL_EINVAL);
    assert_int_equal(spool_ack(sp, 1), SPOOL_OK);

    uint8_t one = 0;
    assert_int_equal(
        spool_append(sp, 1, &one, (size_t)SPOOL_RECORD_MAX + 1, 1, NULL),
        SPOOL_ETOOBIG);
    assert_int_equal(spool_append(sp, 7, NULL, 0, 0, NULL), SPOOL_OK);
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
    assert_int_equal(r.seq, 2);
    assert_int_equal(spool_ack(sp, 2), SPOOL_OK);
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK); /* an empty payload */
    assert_int_equal(r.seq, 3);
    assert_int_equal(r.len, 0);
    assert_int_equal(r.kind, 7);
    assert_int_equal(spool_ack(sp, 3), SPOOL_OK);
    assert_int_equal(spool_peek(sp, &r), SPOOL_EMPTY);
    assert_string_equal(spool_result_name(SPOOL_FULL), "full");
    spool_close(sp);
    remove_dir(dir);
}

static void test_bound(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 4096, 10000);
    static uint8_t buf[1000];
    int accepted = 0, rc;
    uint64_t seq;
    while ((rc = spool_append(sp, 2, buf, sizeof(buf), 10, &seq)) == SPOOL_OK)
        accepted++;
    assert_int_equal(rc, SPOOL_FULL);
    assert_non_null(strstr(spool_error(sp), "full"));
    assert_non_null(strstr(spool_error(sp), "NETRA_SPOOL_MAX_BYTES"));
    assert_int_equal(spool_append(sp, 2, buf, sizeof(buf), 10, &seq),
                     SPOOL_FULL);

    spool_stats st;
    spool_get_stats(sp, &st);
    assert_true(accepted >= 8);
    assert_true(st.disk_bytes <= 10000);
    assert_int_equal(st.pending_records, (uint64_t)accepted);
    assert_int_equal(st.refused_records, 2);
    assert_int_equal(st.refused_count, 20);
    assert_int_equal(st.next_seq, (uint64_t)accepted + 1); /* no gap */
    assert_int_equal(spool_append(sp, 2, buf, 10, 1, &seq), SPOOL_OK);

    spool_record r;
    int n = 0;
    while (spool_peek(sp, &r) == SPOOL_OK) {
        assert_int_equal(spool_ack(sp, r.seq), SPOOL_OK);
        n++;
    }
    assert_int_equal(n, accepted + 1); /* nothing accepted was dropped */
    assert_int_equal(spool_append(sp, 2, buf, sizeof(buf), 10, &seq),
                     SPOOL_OK); /* room again */
    spool_close(sp);
    remove_dir(dir);
}

static void test_lock(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    int ready[2], done[2];
    assert_int_equal(pipe(ready), 0);
    assert_int_equal(pipe(done), 0);

    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0) { /* holds the spool until told to stop */
        spool_options o = {.dir = dir};
        spool *sp = NULL;
        char ok = spool_open(&o, &sp, NULL, 0) == SPOOL_OK ? 'y' : 'n';
        if (write(ready[1], &ok, 1) != 1) _exit(2);
        char c;
        if (read(done[0], &c, 1) < 0) _exit(3);
        spool_close(sp);
        _exit(0);
    }
    char ok = 0;
    assert_int_equal(read(ready[0], &ok, 1), 1);
    assert_int_equal(ok, 'y');

    spool_options o = {.dir = dir};
    spool *sp = NULL;
    char err[512], pid[32];
    assert_int_equal(spool_open(&o, &sp, err, sizeof(err)), SPOOL_ELOCKED);
    assert_null(sp);
    snprintf(pid, sizeof(pid), "pid %d", (int)child);
    assert_non_null(strstr(err, pid));
    assert_non_null(strstr(err, dir));
    assert_non_null(strstr(err, "NETRA_SPOOL_DIR"));

    assert_int_equal(write(done[1], "x", 1), 1);
    int status;
    assert_int_equal(waitpid(child, &status, 0), child);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    assert_int_equal(spool_open(&o, &sp, err, sizeof(err)), SPOOL_OK);
    spool *second = NULL; /* a second opener in this process too */
    assert_int_equal(spool_open(&o, &second, err, sizeof(err)), SPOOL_ELOCKED);
    snprintf(pid, sizeof(pid), "pid %d", (int)getpid());
    assert_non_null(strstr(err, pid));
    spool_close(sp);
    close(ready[0]);
    close(ready[1]);
    close(done[0]);
    close(done[1]);
    remove_dir(dir);
}

static void test_open_errors(void **state) {
    (void)state;
    spool_options o = {.dir = "/nonexistent/netra-spool"};
    spool *sp = NULL;
    char err[512];
    assert_int_equal(spool_open(&o, &sp, err, sizeof(err)), SPOOL_EIO);
    assert_non_null(strstr(err, "/nonexistent/netra-spool"));
    assert_non_null(strstr(err, "mkdir -p"));
    char dir[512], file[600];
    make_dir(dir, sizeof(dir));
    snprintf(file, sizeof(file), "%s/plain", dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fclose(f);
    o.dir = file;
    assert_int_equal(spool_open(&o, &sp, err, sizeof(err)), SPOOL_EIO);
    assert_non_null(strstr(err, "not a directory"));
    remove_dir(dir);
    o.dir = NULL;
    assert_int_equal(spool_open(&o, &sp, err, sizeof(err)), SPOOL_EINVAL);
}

/* Five records, then a reopen (new segment) and five more. */
static void two_segments(const char *dir) {
    spool *sp = open_ok(dir, 0, 0);
    for (int i = 0; i < 5; i++)
        append_one(sp);
    spool_close(sp);
    sp = open_ok(dir, 0, 0);
    for (int i = 0; i < 5; i++)
        append_one(sp);
    spool_close(sp);
}

static void test_corrupt_payload(void **state) {
    (void)state;
    char dir[512], segs[4][300];
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    long off = record_offset(segs[0], 2); /* record 3 */
    flip_byte(segs[0], off + 32 + 5);

    spool *sp = open_ok(dir, 0, 0);
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.corrupt_records, 1);
    assert_int_equal(st.pending_records, 9);
    char where[400];
    snprintf(where, sizeof(where), "%s@%ld: record 3: payload checksum",
             segs[0], off);
    assert_non_null(strstr(reports, where));
    assert_int_equal(nreports, 1);

    uint64_t seen[16];
    assert_int_equal(drain(sp, seen, 16), 9);
    uint64_t want[] = {1, 2, 4, 5, 6, 7, 8, 9, 10};
    for (int i = 0; i < 9; i++)
        assert_int_equal(seen[i], want[i]);
    assert_int_equal(
        strstr(strstr(reports, "payload checksum") + 1, "payload checksum"),
        NULL); /* only once */
    assert_non_null(strstr(reports, "renamed to"));
    assert_int_equal(count_suffix(dir, ".corrupt"), 1); /* kept to see */
    spool_close(sp);
    remove_dir(dir);
}

static void test_corrupt_record_header(void **state) {
    (void)state;
    char dir[512], segs[4][300];
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    long off = record_offset(segs[0], 1); /* record 2's length field */
    flip_byte(segs[0], off + 5);

    spool *sp = open_ok(dir, 0, 0);
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.corrupt_records, 1);
    assert_non_null(strstr(reports, "bad record header"));
    assert_non_null(strstr(reports, "to the next valid record"));

    uint64_t seen[16];
    assert_int_equal(drain(sp, seen, 16), 9); /* 3..5 found again */
    uint64_t want[] = {1, 3, 4, 5, 6, 7, 8, 9, 10};
    for (int i = 0; i < 9; i++)
        assert_int_equal(seen[i], want[i]);
    spool_close(sp);
    remove_dir(dir);
}

static void test_torn_tail(void **state) {
    (void)state;
    char dir[512], segs[4][300];
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    long off = record_offset(segs[0], 4); /* record 5, cut mid-payload */
    assert_int_equal(truncate(segs[0], off + 32 + 3), 0);

    spool *sp = open_ok(dir, 0, 0);
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.torn_tails, 1);
    assert_int_equal(st.corrupt_records, 0);
    char where[400];
    snprintf(where, sizeof(where), "%s@%ld: torn tail", segs[0], off);
    assert_non_null(strstr(reports, where));

    uint64_t seen[16];
    assert_int_equal(drain(sp, seen, 16), 9);
    uint64_t want[] = {1, 2, 3, 4, 6, 7, 8, 9, 10};
    for (int i = 0; i < 9; i++)
        assert_int_equal(seen[i], want[i]);
    spool_close(sp);

    /* A tail cut inside a record header, in the last segment. */
    remove_dir(dir);
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    off = record_offset(segs[1], 4);
    assert_int_equal(truncate(segs[1], off + 10), 0);
    sp = open_ok(dir, 0, 0);
    assert_non_null(strstr(reports, "into a record header"));
    assert_int_equal(drain(sp, seen, 16), 9);
    assert_int_equal(seen[8], 9);
    assert_int_equal(append_one(sp), 10); /* 10 was lost unread */
    spool_close(sp);
    remove_dir(dir);
}

static void test_corrupt_segment_header(void **state) {
    (void)state;
    char dir[512], segs[4][300];
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    flip_byte(segs[0], 1); /* the magic */

    spool *sp = open_ok(dir, 0, 0);
    spool_stats st;
    spool_get_stats(sp, &st);
    assert_int_equal(st.quarantined, 1);
    assert_int_equal(st.pending_records, 5);
    assert_non_null(strstr(reports, "bad segment magic"));
    assert_non_null(strstr(reports, ".corrupt"));
    char moved[320];
    snprintf(moved, sizeof(moved), "%s.corrupt", segs[0]);
    assert_int_equal(access(moved, F_OK), 0);

    uint64_t seen[16];
    assert_int_equal(drain(sp, seen, 16), 5);
    assert_int_equal(seen[0], 6);
    spool_close(sp);

    /* A newer format version, with a correct checksum. */
    remove_dir(dir);
    make_dir(dir, sizeof(dir));
    two_segments(dir);
    assert_int_equal(list_segs(dir, segs, 4), 2);
    int fd = open(segs[1], O_RDWR);
    uint8_t h[32];
    assert_int_equal(pread(fd, h, 32, 0), 32);
    h[8] = 2;
    uint32_t c = spool_crc32c(0, h, 28);
    for (int i = 0; i < 4; i++)
        h[28 + i] = (uint8_t)(c >> (8 * i));
    assert_int_equal(pwrite(fd, h, 32, 0), 32);
    close(fd);
    sp = open_ok(dir, 0, 0);
    assert_non_null(strstr(reports, "unsupported segment format version"));
    assert_int_equal(drain(sp, seen, 16), 5);
    assert_int_equal(seen[4], 5);
    spool_close(sp);
    remove_dir(dir);
}

static void test_damaged_cursor(void **state) {
    (void)state;
    char dir[512], path[600];
    make_dir(dir, sizeof(dir));
    spool *sp = open_ok(dir, 0, 0);
    for (int i = 0; i < 4; i++)
        append_one(sp);
    spool_record r;
    assert_int_equal(spool_peek(sp, &r), SPOOL_OK);
    assert_int_equal(spool_ack(sp, r.seq), SPOOL_OK);
    spool_close(sp);
    snprintf(path, sizeof(path), "%s/cursor", dir);
    flip_byte(path, 17);

    sp = open_ok(dir, 0, 0); /* replays everything: at least once */
    assert_non_null(strstr(reports, "damaged cursor"));
    assert_int_equal(drain(sp, NULL, 0), 4);
    spool_close(sp);
    remove_dir(dir);
}

/* ---- crash safety ---- */

#define CRASH_ROUNDS 20
#define CRASH_MAX_SEQ 200000
#define ACK_FLAG (1ull << 63)
#define ACK_INTENT (1ull << 62)

static void crash_child(const char *dir, int out, bool sync) {
    spool_options o = {.dir = dir,
                       .segment_bytes = 16384,
                       .max_bytes = 256ull << 20,
                       .sync_every = sync ? 1 : -1};
    spool *sp = NULL;
    if (spool_open(&o, &sp, NULL, 0) != SPOOL_OK) _exit(2);
    static uint8_t buf[4096];
    for (int i = 0;; i++) {
        spool_stats st;
        spool_get_stats(sp, &st);
        size_t len = payload(st.next_seq, buf);
        uint64_t seq;
        if (spool_append(sp, (uint16_t)(st.next_seq % 3 + 1), buf, len,
                         (uint32_t)(st.next_seq % 100), &seq) != SPOOL_OK)
            _exit(3);
        if (write(out, &seq, sizeof(seq)) != sizeof(seq)) _exit(4);
        spool_record r;
        uint64_t last = 0;
        if (i % 7 != 6) continue;
        for (int k = 0;
             k < 1 + i % 5 && spool_peek_next(sp, last, &r) == SPOOL_OK; k++)
            last = r.seq; /* a batch of up to five */
        if (!last) continue;
        uint64_t a = last | ACK_INTENT; /* may be gone from here on */
        if (write(out, &a, sizeof(a)) != sizeof(a)) _exit(5);
        if (spool_ack_through(sp, last) != SPOOL_OK) _exit(6);
        a = last | ACK_FLAG; /* must be gone */
        if (write(out, &a, sizeof(a)) != sizeof(a)) _exit(7);
    }
}

static void copy_dir(const char *from, const char *to) {
    struct dirent **ents;
    int n = scandir(from, &ents, NULL, alphasort);
    assert_true(n >= 0);
    static char buf[1 << 16];
    for (int i = 0; i < n; i++) {
        char a[1024], b[1024];
        snprintf(a, sizeof(a), "%s/%s", from, ents[i]->d_name);
        snprintf(b, sizeof(b), "%s/%s", to, ents[i]->d_name);
        struct stat st;
        if (stat(a, &st) == 0 && S_ISREG(st.st_mode)) {
            int in = open(a, O_RDONLY),
                o = open(b, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            ssize_t k;
            while ((k = read(in, buf, sizeof(buf))) > 0)
                assert_int_equal(write(o, buf, (size_t)k), k);
            close(in);
            close(o);
        }
        free(ents[i]);
    }
    free(ents);
}

static void test_crash_safety(void **state) {
    (void)state;
    char dir[512];
    make_dir(dir, sizeof(dir));
    static bool appended[CRASH_MAX_SEQ];
    uint64_t acked = 0, maybe_acked = 0, max_seq = 0, torn = 0;
    srand((unsigned)time(NULL) ^ (unsigned)getpid());

    for (int round = 0; round < CRASH_ROUNDS; round++) {
        int p[2];
        assert_int_equal(pipe(p), 0);
        pid_t child = fork();
        assert_true(child >= 0);
        if (child == 0) {
            close(p[0]);
            crash_child(dir, p[1], round % 2 == 0);
        }
        close(p[1]);
        struct timespec ts = {0, (long)(5 + rand() % 120) * 1000000L};
        nanosleep(&ts, NULL);
        kill(child, SIGKILL);
        int status;
        assert_int_equal(waitpid(child, &status, 0), child);
        assert_true(WIFSIGNALED(status)); /* killed, not failed */

        uint64_t v;
        while (read(p[0], &v, sizeof(v)) == sizeof(v)) {
            if (v & ACK_FLAG) {
                acked = v & ~ACK_FLAG;
                continue;
            }
            if (v & ACK_INTENT) {
                maybe_acked = v & ~ACK_INTENT;
                continue;
            }
            assert_true(v < CRASH_MAX_SEQ);
            appended[v] = true;
            if (v > max_seq) max_seq = v;
        }
        close(p[0]);

        /* Replay a copy, so the original keeps growing across rounds. */
        char copy[512];
        make_dir(copy, sizeof(copy));
        copy_dir(dir, copy);
        spool *sp = open_sync(copy, 16384, 256ull << 20, -1);
        static bool seen[CRASH_MAX_SEQ];
        memset(seen, 0, sizeof(seen));
        spool_record r;
        uint64_t last = 0;
        int rc;
        while ((rc = spool_peek(sp, &r)) == SPOOL_OK) {
            assert_true(r.seq > last);   /* in order */
            assert_true(r.seq > acked);  /* acked stays delivered */
            assert_true(payload_ok(&r)); /* intact */
            assert_true(r.seq < CRASH_MAX_SEQ);
            seen[r.seq] = true;
            last = r.seq;
            assert_int_equal(spool_ack(sp, r.seq), SPOOL_OK);
        }
        assert_int_equal(rc, SPOOL_EMPTY);
        spool_stats st;
        spool_get_stats(sp, &st);
        assert_int_equal(st.corrupt_records, 0);
        torn += st.torn_tails;
        spool_close(sp);

        for (uint64_t s = maybe_acked + 1; s <= max_seq; s++)
            if (appended[s] && !seen[s])
                fail_msg("round %d: accepted record %llu was lost (copy "
                         "%s, ack %llu)",
                         round, (unsigned long long)s, copy,
                         (unsigned long long)acked);
        remove_dir(copy);
    }
    assert_true(max_seq > 20); /* the children did get to work */
    print_message("crash rounds: %d, records accepted: %llu, last ack "
                  "%llu, torn tails seen on replays: %llu\n",
                  CRASH_ROUNDS, (unsigned long long)max_seq,
                  (unsigned long long)acked, (unsigned long long)torn);
    remove_dir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc32c),
        cmocka_unit_test(test_order_across_rolls),
        cmocka_unit_test(test_reopen_resumes),
        cmocka_unit_test(test_read_ahead),
        cmocka_unit_test(test_ack_rules),
        cmocka_unit_test(test_bound),
        cmocka_unit_test(test_lock),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_corrupt_payload),
        cmocka_unit_test(test_corrupt_record_header),
        cmocka_unit_test(test_torn_tail),
        cmocka_unit_test(test_corrupt_segment_header),
        cmocka_unit_test(test_damaged_cursor),
        cmocka_unit_test(test_crash_safety),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
