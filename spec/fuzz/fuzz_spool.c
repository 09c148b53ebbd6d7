/* Fuzz target: the fuzz input becomes the oldest segment file of a spool
 * (and, by the first byte's choice, its cursor), then the spool is opened
 * and replayed to the end. It must never crash, hang or read out of
 * bounds, and a good segment after the damaged one is always replayed.
 *
 * First byte: bit 0 puts a valid segment header in front of the rest;
 * bit 1 repairs record markers and checksums so that most records are
 * valid (damage then sits between them); bit 2 writes the first 32 bytes
 * as the cursor file. */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "spool.h"

#define SENTINEL_SEQ (1ull << 40)

static char dir[256];
static volatile uint8_t sink; /* touches every payload byte */

static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void clear_dir(void) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[512];
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    if (d) closedir(d);
}

static void write_file(const char *name, const uint8_t *a, size_t alen,
                       const uint8_t *b, size_t blen) {
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) abort();
    if ((alen && write(fd, a, alen) != (ssize_t)alen) ||
        (blen && write(fd, b, blen) != (ssize_t)blen))
        abort();
    close(fd);
}

/* Makes records out of the body where it can: marker, a length that
 * fits, rising sequence numbers and correct checksums, except where the
 * input's own byte says to leave one broken. */
static void repair(uint8_t *body, size_t len) {
    size_t off = 0;
    uint64_t seq = 1;
    while (len - off >= 32) {
        uint8_t *h = body + off;
        size_t room = len - off - 32;
        uint32_t plen = (uint32_t)(h[4] | h[5] << 8) % (uint32_t)(room + 1);
        bool broken = h[31] == 0xAA;
        memcpy(h, "NSRC", 4);
        put32(h + 4, plen);
        put64(h + 8, seq++);
        h[18] = h[19] = 0;
        put32(h + 24, spool_crc32c(0, h + 32, plen));
        put32(h + 28, spool_crc32c(0, h, 28));
        if (broken) h[32 + plen / 2 < len - off ? 32 + plen / 2 : 0] ^= 1;
        off += 32 + plen;
    }
}

static void quiet_report(void *ud, const char *path, uint64_t off,
                         const char *reason) {
    (void)ud;
    (void)path;
    (void)off;
    (void)reason;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!dir[0]) {
        snprintf(dir, sizeof(dir), "/tmp/fuzz-spool.XXXXXX");
        if (!mkdtemp(dir)) abort();
    }
    if (size < 1) return 0;
    clear_dir();
    uint8_t mode = data[0];
    data++;
    size--;

    /* A good newer segment holding one record, with sequence numbers
     * above any that repair() makes. */
    static const char sentinel[] = "sentinel";
    uint8_t good[32 + 32 + sizeof(sentinel)] = {0};
    memcpy(good, "NETRASPL", 8);
    put32(good + 8, 1);
    put32(good + 12, 32);
    put64(good + 16, SENTINEL_SEQ);
    put32(good + 28, spool_crc32c(0, good, 28));
    uint8_t *rec = good + 32;
    memcpy(rec, "NSRC", 4);
    put32(rec + 4, sizeof(sentinel));
    put64(rec + 8, SENTINEL_SEQ);
    rec[16] = 0xEF;
    rec[17] = 0xBE;
    put32(rec + 20, 1);
    memcpy(rec + 32, sentinel, sizeof(sentinel));
    put32(rec + 24, spool_crc32c(0, sentinel, sizeof(sentinel)));
    put32(rec + 28, spool_crc32c(0, rec, 28));
    write_file("seg-00000000000000000001.spool", good, sizeof(good), NULL, 0);

    uint8_t *body = malloc(size + 1);
    memcpy(body, data, size);
    uint8_t head[32] = {0};
    size_t hlen = 0;
    if (mode & 1) {
        memcpy(head, "NETRASPL", 8);
        put32(head + 8, 1);
        put32(head + 12, 32);
        put64(head + 16, 1);
        put32(head + 28, spool_crc32c(0, head, 28));
        hlen = 32;
    }
    if ((mode & 3) == 3) repair(body, size);
    write_file("seg-00000000000000000000.spool", head, hlen, body, size);
    if ((mode & 4) && size >= 32) write_file("cursor", data, 32, NULL, 0);
    free(body);

    spool_options o = {.dir = dir,
                       .segment_bytes = 4096,
                       .sync_every = -1,
                       .report = quiet_report};
    char err[512];
    spool *sp = NULL;
    if (spool_open(&o, &sp, err, sizeof(err)) != SPOOL_OK) {
        fprintf(stderr, "spool_open: %s\n", err);
        abort();
    }
    spool_record r;
    uint64_t last = 0;
    bool seen = false;
    int n = 0, rc;
    while ((rc = spool_peek_next(sp, last, &r)) == SPOOL_OK) {
        if (r.seq <= last || ++n > 100000) abort(); /* order, no loop */
        if (r.kind == 0xBEEF && r.len == sizeof(sentinel) &&
            !memcmp(r.data, sentinel, r.len))
            seen = true;
        for (size_t i = 0; i < r.len; i++)
            sink ^= ((const uint8_t *)r.data)[i];
        last = r.seq;
        if (n % 3 == 0 && spool_ack_through(sp, last) != SPOOL_OK) abort();
    }
    if (rc != SPOOL_EMPTY) abort();
    if ((mode & 7) == 3 && !seen) abort(); /* later segments replay */
    if (last && spool_ack_through(sp, last) != SPOOL_OK) abort();
    if (spool_append(sp, 1, "x", 1, 1, NULL) != SPOOL_OK) abort();
    if (spool_peek(sp, &r) != SPOOL_OK || r.len != 1) abort();
    spool_close(sp);
    return 0;
}
