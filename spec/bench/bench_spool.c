/* Benchmark: spool appends and replay on the local disk.
 *
 *   batches: records of 10,000 TSV rows (~0.86 MB) appended with an
 *            fdatasync per batch and without, then replayed (peek, ack);
 *   events:  one ~160-byte record each (the analytics write-ahead
 *            shape), no sync, replayed 10,000 records per acknowledgement.
 *
 * Prints records/s and MB/s for each. Built and run by spec/bench/spool.sh
 * against build/libnetra_core.a. Argument: a scratch directory. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "spool.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void clear(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    char path[1024];
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    if (d) closedir(d);
}

static spool *open_spool(const char *dir, int sync_every) {
    spool_options o = {
        .dir = dir, .max_bytes = 4ull << 30, .sync_every = sync_every};
    spool *sp;
    char err[512];
    if (spool_open(&o, &sp, err, sizeof(err)) != SPOOL_OK) {
        fprintf(stderr, "bench_spool: %s\n", err);
        exit(1);
    }
    return sp;
}

/* rows TSV rows of about 120 bytes each. */
static char *make_rows(int rows, size_t *len) {
    char *buf = malloc((size_t)rows * 160);
    size_t n = 0;
    for (int i = 0; i < rows; i++)
        n += (size_t)sprintf(buf + n,
                             "%08x-%04x-4%03x-8%03x-%012x\t"
                             "1733300000\t%d\tuser-%d\trun-%d\tsearch_docs"
                             "\tok\t\t%d\n",
                             i * 2654435761u, i & 0xffff, i & 0xfff,
                             (i >> 3) & 0xfff, i, i % 1000, i % 97, i % 13,
                             i % 500);
    *len = n;
    return buf;
}

static void report(const char *what, int records, double bytes, double secs) {
    printf("%-44s %8d records %9.1f records/s %8.1f MB/s\n", what, records,
           records / secs, bytes / secs / 1e6);
}

static void append_run(const char *dir, const char *label, int sync_every,
                       const char *data, size_t len, int records,
                       uint32_t rows) {
    clear(dir);
    spool *sp = open_spool(dir, sync_every);
    double t0 = now();
    for (int i = 0; i < records; i++)
        if (spool_append(sp, 1, data, len, rows, NULL) != SPOOL_OK) {
            fprintf(stderr, "append: %s\n", spool_error(sp));
            exit(1);
        }
    spool_sync(sp);
    report(label, records, (double)len * records, now() - t0);
    spool_close(sp);
}

static void replay_run(const char *dir, const char *label, int sync_every,
                       int per_ack) {
    spool *sp = open_spool(dir, sync_every);
    spool_record r;
    uint64_t last = 0;
    double bytes = 0, t0 = now();
    int n = 0, in_batch = 0;
    while (spool_peek_next(sp, last, &r) == SPOOL_OK) {
        last = r.seq;
        bytes += (double)r.len;
        n++;
        if (++in_batch == per_ack) {
            spool_ack_through(sp, last);
            in_batch = 0;
        }
    }
    if (in_batch) spool_ack_through(sp, last);
    report(label, n, bytes, now() - t0);
    spool_close(sp);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    size_t blen, elen;
    char *batch = make_rows(10000, &blen);
    char *event = make_rows(2, &elen);
    printf("batch record: %zu bytes (10000 rows); event record: %zu "
           "bytes (2 rows)\n",
           blen, elen);

    append_run(dir, "append batch, fdatasync per batch", 1, batch, blen, 60,
               10000);
    replay_run(dir, "replay batches, ack each (cursor synced)", 1, 1);
    append_run(dir, "append batch, no sync", -1, batch, blen, 300, 10000);
    replay_run(dir, "replay batches, ack each (no sync)", -1, 1);

    append_run(dir, "append event, fdatasync per event", 1, event, elen, 2000,
               2);
    append_run(dir, "append event, no sync", -1, event, elen, 500000, 2);
    replay_run(dir, "replay events, ack per 10000 (synced)", 1, 10000);
    clear(dir);
    free(batch);
    free(event);
    return 0;
}
