/* eventlog: the rotating JSON-lines file (see eventlog.h). */
#include "eventlog.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "log.h"

#define ERR_MAX 512
#define NAME_MAX_LEN 200

struct evlog {
    char *dir;
    char name[NAME_MAX_LEN + 1];
    int dir_fd;
    int lock_fd;
    int fd;
    uint64_t max_bytes;
    int keep;
    int sync_every;
    int unsynced;
    evlog_stats st;
    char err[ERR_MAX];
};

static void set_err(char *err, size_t n, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t n, const char *fmt, ...) {
    if (!err || !n) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, n, fmt, ap);
    va_end(ap);
}

#define EV_ERR(ev, ...) set_err((ev)->err, sizeof((ev)->err), __VA_ARGS__)

static int check_dir(const char *dir, char *err, size_t err_size) {
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (errno == ENOENT)
            set_err(err, err_size,
                    "event log directory %s does not "
                    "exist: create it (mkdir -p %s) or point the event "
                    "log at another directory",
                    dir, dir);
        else if (errno == EACCES)
            set_err(err, err_size,
                    "event log directory %s cannot be reached by this user "
                    "(uid %d): fix the permissions of its parent "
                    "directories",
                    dir, (int)geteuid());
        else
            set_err(err, err_size,
                    "cannot reach event log directory %s: "
                    "%s; point the event log at a directory netra can "
                    "write",
                    dir, strerror(errno));
        return EVLOG_EIO;
    }
    if (!S_ISDIR(st.st_mode)) {
        set_err(err, err_size,
                "event log directory %s is not a "
                "directory: point the event log at a directory",
                dir);
        return EVLOG_EIO;
    }
    if (access(dir, W_OK | X_OK) != 0) {
        set_err(err, err_size,
                "event log directory %s is not writable "
                "by this user (uid %d): fix its permissions (chown or "
                "chmod u+w) or point the event log elsewhere",
                dir, (int)geteuid());
        return EVLOG_EIO;
    }
    return EVLOG_OK;
}

static int take_lock(evlog *ev, char *err, size_t err_size) {
    char lock[NAME_MAX_LEN + 8];
    snprintf(lock, sizeof(lock), "%s.lock", ev->name);
    ev->lock_fd = openat(ev->dir_fd, lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (ev->lock_fd < 0) {
        set_err(err, err_size,
                "cannot open %s/%s: %s; fix the "
                "directory's permissions",
                ev->dir, lock, strerror(errno));
        return EVLOG_EIO;
    }
    if (flock(ev->lock_fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = "";
        ssize_t n = pread(ev->lock_fd, pid, sizeof(pid) - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        set_err(err, err_size,
                "event log %s/%s is in use by another "
                "process (pid %s, per %s/%s): stop that netra instance or "
                "give this one its own directory",
                ev->dir, ev->name, pid[0] ? pid : "unknown", ev->dir, lock);
        return EVLOG_ELOCKED;
    }
    char pid[32];
    int n = snprintf(pid, sizeof(pid), "%d\n", (int)getpid());
    if (ftruncate(ev->lock_fd, 0) != 0 ||
        pwrite(ev->lock_fd, pid, (size_t)n, 0) != n) {
        set_err(err, err_size, "cannot write %s/%s: %s", ev->dir, lock,
                strerror(errno));
        return EVLOG_EIO;
    }
    return EVLOG_OK;
}

/* Opens the current file for appending; closes a line left torn by a
 * crash with a newline. */
static int open_file(evlog *ev) {
    ev->fd = openat(ev->dir_fd, ev->name,
                    O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    struct stat st;
    if (ev->fd < 0 || fstat(ev->fd, &st) != 0) {
        EV_ERR(ev,
               "cannot open event log %s/%s: %s; check the directory's "
               "permissions and free space",
               ev->dir, ev->name, strerror(errno));
        return EVLOG_EIO;
    }
    ev->st.file_bytes = (uint64_t)st.st_size;
    if (st.st_size == 0) return EVLOG_OK;

    char last;
    int rfd = openat(ev->dir_fd, ev->name, O_RDONLY | O_CLOEXEC);
    ssize_t got = rfd >= 0 ? pread(rfd, &last, 1, st.st_size - 1) : -1;
    if (rfd >= 0) close(rfd);
    if (got == 1 && last != '\n') {
        if (write(ev->fd, "\n", 1) != 1) {
            EV_ERR(ev, "cannot write to event log %s/%s: %s", ev->dir, ev->name,
                   strerror(errno));
            return EVLOG_EIO;
        }
        ev->st.file_bytes++;
        log_msg(NLOG_WARN, "EventLog",
                "%s/%s ended inside a line (a crash "
                "while writing?); closed it with a newline",
                ev->dir, ev->name);
    }
    return EVLOG_OK;
}

static int sync_now(evlog *ev) {
    if (ev->fd < 0 || !ev->unsynced || ev->sync_every < 0) return 0;
    if (fdatasync(ev->fd) != 0) return -1;
    ev->unsynced = 0;
    return 0;
}

int evlog_open(const evlog_options *opt, evlog **out, char *err,
               size_t err_size) {
    *out = NULL;
    if (!opt || !opt->dir || !opt->dir[0]) {
        set_err(err, err_size, "evlog_open: no directory given");
        return EVLOG_EINVAL;
    }
    const char *name = opt->name ? opt->name : EVLOG_DEFAULT_NAME;
    if (!name[0] || strchr(name, '/') || strlen(name) > NAME_MAX_LEN ||
        !strcmp(name, ".") || !strcmp(name, "..")) {
        set_err(err, err_size,
                "event log name \"%s\" is not a plain file "
                "name",
                name);
        return EVLOG_EINVAL;
    }
    if (opt->keep < 0 || opt->keep > EVLOG_KEEP_MAX) {
        set_err(err, err_size, "event log keep=%d is outside 0..%d", opt->keep,
                EVLOG_KEEP_MAX);
        return EVLOG_EINVAL;
    }
    int rc = check_dir(opt->dir, err, err_size);
    if (rc != EVLOG_OK) return rc;

    evlog *ev = calloc(1, sizeof(*ev));
    if (!ev || !(ev->dir = strdup(opt->dir))) {
        free(ev);
        set_err(err, err_size, "out of memory opening the event log");
        return EVLOG_ENOMEM;
    }
    snprintf(ev->name, sizeof(ev->name), "%s", name);
    ev->lock_fd = ev->fd = -1;
    ev->max_bytes = opt->max_bytes ? opt->max_bytes : EVLOG_DEFAULT_MAX_BYTES;
    ev->keep = opt->keep;
    ev->sync_every = opt->sync_every == 0 ? 1 : opt->sync_every;

    ev->dir_fd = open(ev->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (ev->dir_fd < 0) {
        set_err(err, err_size, "cannot open event log directory %s: %s",
                ev->dir, strerror(errno));
        rc = EVLOG_EIO;
    } else {
        rc = take_lock(ev, err, err_size);
    }
    if (rc == EVLOG_OK && (rc = open_file(ev)) != EVLOG_OK)
        set_err(err, err_size, "%s", ev->err);
    if (rc != EVLOG_OK) {
        evlog_close(ev);
        return rc;
    }
    *out = ev;
    return EVLOG_OK;
}

void evlog_close(evlog *ev) {
    if (!ev) return;
    if (sync_now(ev) != 0)
        log_msg(NLOG_WARN, "EventLog", "syncing %s/%s on close failed: %s",
                ev->dir, ev->name, strerror(errno));
    if (ev->fd >= 0) close(ev->fd);
    if (ev->lock_fd >= 0) close(ev->lock_fd);
    if (ev->dir_fd >= 0) close(ev->dir_fd);
    free(ev->dir);
    free(ev);
}

/* name.N, or name itself for 0. */
static void rotated_name(const evlog *ev, int n, char *out, size_t size) {
    if (n == 0)
        snprintf(out, size, "%s", ev->name);
    else
        snprintf(out, size, "%s.%d", ev->name, n);
}

/* Shifts name -> name.1 -> name.2 ... (dropping the oldest) and starts an
 * empty file. */
static int rotate(evlog *ev) {
    char from[NAME_MAX_LEN + 16], to[NAME_MAX_LEN + 16];
    if (sync_now(ev) != 0) {
        EV_ERR(ev, "cannot sync event log %s/%s before rotating: %s", ev->dir,
               ev->name, strerror(errno));
        return EVLOG_EIO;
    }
    close(ev->fd);
    ev->fd = -1;

    rotated_name(ev, ev->keep, from, sizeof(from));
    if (unlinkat(ev->dir_fd, from, 0) != 0 && errno != ENOENT) goto fail;
    for (int i = ev->keep - 1; i >= 0; i--) {
        rotated_name(ev, i, from, sizeof(from));
        rotated_name(ev, i + 1, to, sizeof(to));
        if (renameat(ev->dir_fd, from, ev->dir_fd, to) != 0 && errno != ENOENT)
            goto fail;
    }
    if (ev->sync_every >= 0) fsync(ev->dir_fd);
    ev->st.rotations++;
    return open_file(ev);

fail:
    EV_ERR(ev,
           "cannot rotate event log %s/%s (%s): %s; check the "
           "directory's permissions",
           ev->dir, from, ev->name, strerror(errno));
    return EVLOG_EIO; /* the next append opens the file again */
}

/* Does the text look like one JSON object on one line? */
static bool line_ok(evlog *ev, const char *line, size_t len) {
    if (!line || len == 0) {
        EV_ERR(ev, "event log line is empty");
        return false;
    }
    if (len > EVLOG_LINE_MAX) {
        EV_ERR(ev, "event log line of %zu bytes is over the %u-byte limit", len,
               EVLOG_LINE_MAX);
        return false;
    }
    const char *bad = memchr(line, '\n', len);
    if (!bad) bad = memchr(line, '\r', len);
    if (!bad) bad = memchr(line, '\0', len);
    if (bad) {
        EV_ERR(ev,
               "event log line holds a raw %s at byte %zu; escape it "
               "inside JSON strings",
               *bad == '\n'   ? "newline"
               : *bad == '\r' ? "carriage return"
                              : "NUL byte",
               (size_t)(bad - line));
        return false;
    }
    size_t a = 0, b = len;
    while (a < b && (line[a] == ' ' || line[a] == '\t'))
        a++;
    while (b > a && (line[b - 1] == ' ' || line[b - 1] == '\t'))
        b--;
    if (b - a < 2 || line[a] != '{' || line[b - 1] != '}') {
        EV_ERR(ev, "event log line is not a JSON object (it must start "
                   "with '{' and end with '}')");
        return false;
    }
    return true;
}

int evlog_append(evlog *ev, const char *line, size_t len) {
    if (!ev) return EVLOG_EINVAL;
    if (!line_ok(ev, line, len)) {
        ev->st.rejected++;
        return EVLOG_EINVAL;
    }
    if (ev->fd < 0 && open_file(ev) != EVLOG_OK) return EVLOG_EIO;

    if (ev->st.file_bytes > 0 && ev->st.file_bytes + len + 1 > ev->max_bytes &&
        rotate(ev) != EVLOG_OK)
        return EVLOG_EIO;

    struct iovec iov[2] = {{(void *)line, len}, {"\n", 1}};
    size_t want = len + 1, done = 0;
    while (done < want) {
        struct iovec *v = iov;
        int n = 2;
        struct iovec rest[2];
        if (done > 0) { /* rare: continue a short write */
            size_t skip = done;
            for (; n > 0 && skip >= v->iov_len; v++, n--)
                skip -= v->iov_len;
            memcpy(rest, v, (size_t)n * sizeof(*v));
            rest[0].iov_base = (char *)rest[0].iov_base + skip;
            rest[0].iov_len -= skip;
            v = rest;
        }
        ssize_t w = writev(ev->fd, v, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) goto fail;
        done += (size_t)w;
    }
    ev->unsynced++;
    if (ev->sync_every > 0 && ev->unsynced >= ev->sync_every &&
        sync_now(ev) != 0)
        goto fail;

    ev->st.lines++;
    ev->st.bytes += want;
    ev->st.file_bytes += want;
    return EVLOG_OK;

fail:
    EV_ERR(ev, "cannot write to event log %s/%s: %s; check free space", ev->dir,
           ev->name, errno ? strerror(errno) : "short write");
    if (ftruncate(ev->fd, (off_t)ev->st.file_bytes) != 0) {
        close(ev->fd); /* reopened (and the torn line closed) next time */
        ev->fd = -1;
    }
    return EVLOG_EIO;
}

int evlog_sync(evlog *ev) {
    if (!ev) return EVLOG_EINVAL;
    if (ev->fd >= 0 && ev->unsynced && fdatasync(ev->fd) != 0) {
        EV_ERR(ev, "cannot sync event log %s/%s: %s", ev->dir, ev->name,
               strerror(errno));
        return EVLOG_EIO;
    }
    ev->unsynced = 0;
    return EVLOG_OK;
}

void evlog_get_stats(const evlog *ev, evlog_stats *out) {
    *out = ev->st;
}

const char *evlog_error(const evlog *ev) {
    return ev ? ev->err : "no event log";
}
