/* bench_ch_insert: inserts N five-column event rows into ClickHouse through
 * netra's client, in batches, and prints rows/s. With --tsv FILE it writes
 * the same rows as TSV instead (for clickhouse-client and curl).
 * Usage: bench_ch_insert HOST PORT ROWS BATCH [--tsv FILE] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "clickhouse.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *tools[] = {"echo", "clock", "analytics_recent_calls",
                              "search", "fetch"};

/* The values of a row, made before the clock starts: the benchmark times
 * the client (row building and inserting), not the making of test data. */
typedef struct {
    char id[32], user[16];
    size_t id_len, user_len;
} event;

static event *make_events(long n) {
    event *ev = malloc((size_t)n * sizeof *ev);
    for (long i = 0; ev && i < n; i++) {
        ev[i].id_len = (size_t)snprintf(ev[i].id, sizeof ev[i].id,
                                        "ev-%012ld-%08lx", i,
                                        (unsigned long)(i * 2654435761u));
        ev[i].user_len = (size_t)snprintf(ev[i].user, sizeof ev[i].user,
                                          "user_%ld", i % 997);
    }
    return ev;
}

/* One event row: event_id, ts, user_id, tool, duration_ms. */
static void add_row(ch_rows *rows, const event *ev, long i) {
    const char *tool = tools[i % 5];
    ch_rows_str(rows, ev[i].id, ev[i].id_len);
    ch_rows_int(rows, 1760000000 + i / 100);
    ch_rows_str(rows, ev[i].user, ev[i].user_len);
    ch_rows_str(rows, tool, strlen(tool));
    ch_rows_int(rows, (i * 7) % 5000);
    ch_rows_end(rows);
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s HOST PORT ROWS BATCH [--tsv FILE]\n",
                argv[0]);
        return 2;
    }
    long total = atol(argv[3]), batch = atol(argv[4]);
    ch_rows *rows = ch_rows_new();
    event *ev = make_events(total);
    if (!rows || !ev)
        return 1;

    if (argc == 7 && strcmp(argv[5], "--tsv") == 0) {
        FILE *f = fopen(argv[6], "w");
        if (!f) {
            perror(argv[6]);
            return 1;
        }
        for (long i = 0; i < total; i++)
            add_row(rows, ev, i);
        size_t len;
        const char *data = ch_rows_data(rows, &len);
        fwrite(data, 1, len, f);
        fclose(f);
        ch_rows_free(rows);
        free(ev);
        return 0;
    }

    ch_settings s = {argv[1], atoi(argv[2]), "default", "", "default", false};
    ch_options o = {.timeout_ms = 120000};
    ch_client *c = ch_client_new(&s, &o);
    ch_error e;
    if (!c || ch_connect(c, &e) != CH_OK) {
        fprintf(stderr, "connect: %s\n", e.message);
        return 1;
    }
    const char *cols[] = {"event_id", "ts", "user_id", "tool", "duration_ms"};
    double t0 = now_s(), building = 0;
    for (long done = 0; done < total;) {
        ch_rows_clear(rows);
        long n = total - done < batch ? total - done : batch;
        double b0 = now_s();
        for (long i = 0; i < n; i++)
            add_row(rows, ev, done + i);
        building += now_s() - b0;
        if (ch_insert(c, "bench_events", cols, 5, rows, NULL, &e) != CH_OK) {
            fprintf(stderr, "insert: %s\n", e.message);
            return 1;
        }
        done += n;
    }
    double dt = now_s() - t0;
    printf("%.0f\n", (double)total / dt);
    fprintf(stderr, "netra: %.3f s in all, %.3f s building rows\n", dt,
            building);
    ch_rows_free(rows);
    free(ev);
    ch_client_free(c);
    return 0;
}
